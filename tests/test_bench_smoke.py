"""The GPU benchmarks' drivers run end to end on the tiny preset on a CPU, so a GPU session never spends its time on a
broken script. (Their numbers here mean nothing; the GPU runs are in bench/results/.)"""
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU smoke runs; the GPU runs the real benchmarks")


def run(*command, tmp_path):
    done = subprocess.run([sys.executable, *command], cwd=REPO_ROOT, capture_output=True, text=True,
                          env={**os.environ, "OUT": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_train_step_bench(tmp_path):
    out = run("bench/train_step.py", "--preset", "tiny", "--layers", "2", "--seq", "256", "--steps", "2",
              "--stacks", "transformers", "--profile", "--sync_debug", "--trace", "--memory", tmp_path=tmp_path)
    assert "| transformers | " in out and "error" not in out
    assert (tmp_path / "train_step.md").exists()
    profile = (tmp_path / "profile_transformers.md").read_text()
    for row in ["| wall |", "| compute CPU ops |", "| GEMM (cuBLAS / grouped) |", "| `aten::"]:  # CPU ops for kernels
        assert row in profile, row
    assert "sync debugging needs CUDA" in out and not (tmp_path / "sync_transformers.md").exists()
    assert "TRACE transformers\nno GPU kernels in the trace" in out  # a CPU trace: the idle table has nothing to say
    assert (tmp_path / "idle_transformers.md").exists() and (tmp_path / "trace_transformers.json.gz").stat().st_size
    assert "MEMORY transformers\nthe memory peak is a GPU's: it needs CUDA" in out


def test_sft_run_bench(tmp_path):
    out = run("bench/sft_run.py", "--gpus", "0", "--preset", "tiny", "--recipe", "config/recipes/tiny.yaml",
              "--layers", "2", "--seq", "256", "--rows", "baseline,packed", "--steps", "4", "--backends", "fsdp",
              "--extra_flags", "--profile_steps 2 --profile_warmup_steps 1", tmp_path=tmp_path)
    assert "| fsdp | baseline | " in out and "| fsdp | packed | " in out and "error" not in out
    for row in ("baseline", "packed"):  # each run's rank-0 profile, printed after its row and copied to $OUT
        assert f"PROFILE fsdp {row}\nProfile of steps 2-3" in out
        assert "| compute CPU ops |" in (tmp_path / f"profile_fsdp_{row}.md").read_text()

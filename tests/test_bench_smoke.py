"""The GPU benchmarks' drivers run end to end on the tiny preset on a CPU, so a GPU session never spends its time on a
broken script. (Their numbers here mean nothing; the GPU runs are in bench/results/.)"""
import json
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
              "--stacks", "transformers", "--profile", "--sync_debug", "--trace", "--memory", "--lag",
              tmp_path=tmp_path)
    assert "| transformers | " in out and "error" not in out
    lag = (tmp_path / "lag_transformers.md").read_text()  # every kind of mark, in step order
    rows = ["| step start |", "| fwd L0 |", "| fwd L1 experts |", "| forward returned |", "| bwd L1 start |",
            "| rec L1 attn |", "| rec L1 experts |", "| bwd L1 moe-in grad |", "| bwd L0 attn-out grad |",
            "| optimizer launched |"]
    assert all(row in lag for row in rows) and sorted(rows, key=lag.index) == rows, lag
    assert "LAG transformers" in out
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
    assert '"median_sec_per_step": ' in out  # 2 logging intervals of 4 steps: the last one
    for row in ("baseline", "packed"):  # each run's rank-0 profile, printed after its row and copied to $OUT
        assert f"PROFILE fsdp {row}\nProfile of steps 2-3" in out
        assert "| compute CPU ops |" in (tmp_path / f"profile_fsdp_{row}.md").read_text()


def test_sft_run_median_interval_leaves_out_the_first_and_a_slow_one(tmp_path):
    """The figure the bench compares runs by: the median interval after the first, robust to one slow interval."""
    from bench.sft_run import median_interval
    intervals = [(12.5, 1_000), (0.48, 30_000), (0.24, 60_000), (0.25, 58_000), (0.55, 27_000), (0.23, 61_000)]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": 2 * (i + 1), "sec_per_step": sec, "tokens_per_sec_per_gpu": rate})
                               + "\n" for i, (sec, rate) in enumerate(intervals)))
    assert median_interval(metrics) == {"median_sec_per_step": 0.25, "median_tokens_per_sec_per_gpu": 58_000}
    metrics.write_text(metrics.read_text().splitlines()[0] + "\n")  # one interval: nothing steady to report
    assert median_interval(metrics) == {}


def test_train_step_rounds_alternate_and_average():
    from bench.train_step import mean_over_rounds, round_order, table
    assert round_order(["ours", "peer"], 3) == ["ours", "peer", "peer", "ours", "ours", "peer"]
    result = lambda stack, sec, peak: {"stack": stack, "sec_per_step": sec, "tokens_per_sec": round(8192 / sec),  # noqa: E731
                                       "tflops": 100 * 0.2 / sec, "mfu": 0.2 / sec / 7.9, "peak_gib": peak}
    runs = [result("ours", 0.15, 40.0), result("liger_flex", 0.24, 42.0), result("liger_flex", 0.26, 42.1),
            result("ours", 0.17, 40.2)]
    ours, peer = mean_over_rounds(runs)
    assert ours["sec_per_step"] == 0.16 and ours["rounds_sec_per_step"] == [0.15, 0.17] and ours["peak_gib"] == 40.2
    assert ours["tokens_per_sec"] == round(8192 / 0.16) and abs(ours["tflops"] - 125.0) < 0.1
    assert peer["sec_per_step"] == 0.25 and peer["tokens_per_sec"] == round(8192 / 0.25)
    assert "| ours | 0.160 | 51,200 | 125.0 | 15.8% | 40.2 | 1.56x | 0.150 / 0.170 |" in table([ours, peer])
    failed = mean_over_rounds(runs[:3] + [{"stack": "ours", "error": "timed out"}])[0]
    assert failed == {"stack": "ours", "error": "timed out"}  # a failed round is not averaged away

"""The MFU formula, the efficiency records, and the plot command."""
import json

import pytest

from sft.metrics import EfficiencyMeter, active_matmul_params, flops_per_token
from sft.model import preset_config
from sft.plot import main as plot_main


def test_flops_per_token_matches_the_published_count():
    config = preset_config("qwen3-30b-a3b")
    # Qwen3-30B-A3B is "A3B": about 3.3 B active parameters, of which 0.31 B the embedding lookup (not a matmul).
    assert 2.9e9 < active_matmul_params(config) + 2048 * 151936 < 3.5e9
    # bench/results/baselines_h200_202611.md: 5.12 GFLOP/token for 6 layers at seq 8192 (causal: a token sees 4096 keys on average).
    six_layers = preset_config("qwen3-30b-a3b", num_hidden_layers=6)
    assert flops_per_token(six_layers, mean_context=8192 / 2) == pytest.approx(5.12e9, rel=0.01)
    # ... and 27.9 GFLOP/token for the full model.
    assert flops_per_token(config, mean_context=8192 / 2) == pytest.approx(27.9e9, rel=0.01)


def test_meter_records_and_summary(tmp_path, monkeypatch):
    clock = iter([0.0, 2.0, 4.0])
    monkeypatch.setattr("sft.metrics.time.perf_counter", lambda: next(clock))
    meter = EfficiencyMeter(flops_per_token=1e9, world_size=2, peak_tflops=1.0, output_dir=str(tmp_path))
    meter.start(step=0, tokens=0)
    first = meter.measure(step=10, tokens=4000, logs={"loss": 3.0})
    meter.measure(step=20, tokens=8000, logs={"loss": 2.0})
    assert first["sec_per_step"] == 0.2 and first["tokens_per_sec"] == 2000
    assert first["tokens_per_sec_per_gpu"] == 1000 and first["mfu"] == 1.0  # 1000 tok/s * 1 GFLOP = 1 TFLOP/s
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    required = {"step", "loss", "tokens_per_sec", "tokens_per_sec_per_gpu", "mfu", "peak_mem_gib", "sec_per_step"}
    assert len(records) == 2 and all(required <= set(r) for r in records)
    summary = meter.summary()
    assert summary["first_loss"] == 3.0 and summary["last_loss"] == 2.0 and summary["logging_intervals"] == 1


def test_a_new_run_starts_the_file_afresh_and_a_resumed_one_keeps_its_past(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (2, 4, 6, 8)))
    EfficiencyMeter(1e9, 1, None, str(tmp_path)).start(step=4, tokens=0)  # resumed from checkpoint-4
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [2, 4]
    EfficiencyMeter(1e9, 1, None, str(tmp_path)).start(step=0, tokens=0)  # a new run in the same output_dir
    assert path.read_text() == ""


def test_plot_writes_a_png(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 5 - s / 10, "tokens_per_sec_per_gpu": 100.0}) + "\n"
                            for s in range(1, 6)))
    plot_main([str(path)])
    assert (tmp_path / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summary_rates_are_totals_over_totals(monkeypatch):
    """Intervals of 1 s and 3 s with 3000 tokens each: 6000 tokens / 4 s = 1500 tokens/s, not the mean rate 2000."""
    clock = iter([0.0, 10.0, 11.0, 14.0])
    monkeypatch.setattr("sft.metrics.time.perf_counter", lambda: next(clock))
    meter = EfficiencyMeter(flops_per_token=1e9, world_size=1, peak_tflops=2.0, output_dir=None)
    meter.start(step=0, tokens=0)
    meter.measure(step=2, tokens=100, logs={})  # the warm-up interval, left out
    meter.measure(step=4, tokens=3100, logs={})
    meter.measure(step=6, tokens=6100, logs={})
    summary = meter.summary()
    assert summary["tokens_per_sec"] == 1500 and summary["sec_per_step"] == 1.0 and summary["mfu"] == 0.75

"""The real CLI on the bundled data, as a user runs it: training, metrics, resume, and a checkpoint that stock
transformers loads with no code of ours."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO_ROOT

SHORT_RUN = ["--config", "config/recipes/tiny.yaml", "--max_seq_length", "128", "--per_device_train_batch_size", "2",
             "--learning_rate", "3e-3", "--lr_scheduler_type", "constant", "--warmup_steps", "0", "--logging_steps", "2"]


def train(output_dir, *flags):
    run = subprocess.run([sys.executable, "train.py", *SHORT_RUN, "--output_dir", str(output_dir), *flags],
                         cwd=REPO_ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("run")
    train(output_dir, "--max_steps", "10", "--save_steps", "5", "--report_to", "tensorboard")
    return output_dir


def test_loss_falls_and_metrics_are_logged(trained):
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6, 8, 10]
    for record in records:
        assert {"loss", "tokens_per_sec", "tokens_per_sec_per_gpu", "mfu", "peak_mem_gib", "sec_per_step"} <= set(record)
        assert record["tokens_per_sec"] > 0 and record["peak_mem_gib"] > 0
    assert records[-1]["loss"] < records[0]["loss"] - 1.0
    summary = json.loads((trained / "efficiency_summary.json").read_text())
    assert summary["last_loss"] == records[-1]["loss"]


def test_reporting_integrations_see_the_efficiency_figures(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(next(trained.rglob("events.out.tfevents.*")).parent))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/tokens_per_sec_per_gpu", "train/sec_per_step", "train/peak_mem_gib"} <= tags, tags


def test_checkpoint_is_stock_layout_and_loads_without_our_code(trained, tmp_path):
    keys = load_file(str(trained / "model.safetensors")).keys()
    assert "model.layers.0.mlp.experts.0.gate_proj.weight" in keys  # the original per-expert layout
    assert not any("gate_up_proj" in key for key in keys)
    config = json.loads((trained / "config.json").read_text())
    assert "scattermoe" not in json.dumps(config)
    script = f"""
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
assert not any("monkey_patch" in m or m.startswith("sft") for m in sys.modules)
model = AutoModelForCausalLM.from_pretrained({str(trained)!r})
tokenizer = AutoTokenizer.from_pretrained({str(trained)!r})
ids = tokenizer.apply_chat_template([{{"role": "user", "content": "Uppercase: river"}}], add_generation_prompt=True,
                                    return_tensors="pt", return_dict=True)["input_ids"]
out = model.generate(ids, max_new_tokens=4, do_sample=False)
assert out.shape[1] == ids.shape[1] + 4
print("ok", model.config.num_experts)
"""
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                         env={"HF_HUB_OFFLINE": "1", "TORCHAO_FORCE_SKIP_LOADING_SO_FILES": "1", "PATH": "/usr/bin"})
    assert run.returncode == 0 and "ok 8" in run.stdout, run.stderr[-3000:]


def test_resume_continues_the_same_run(trained, tmp_path):
    """Resuming from checkpoint-5 of a 10-step run ends on the same weights as the uninterrupted run."""
    train(tmp_path, "--max_steps", "10", "--save_steps", "5", "--resume_from_checkpoint", str(trained / "checkpoint-5"))
    uninterrupted = load_file(str(trained / "model.safetensors"))
    resumed = load_file(str(tmp_path / "model.safetensors"))
    for key, value in uninterrupted.items():
        torch.testing.assert_close(resumed[key], value, atol=0, rtol=0)


def test_profile_steps_writes_a_report(tmp_path):
    """--profile_steps through the CLI: after 1 warm-up step, steps 2-3 profiled, the report beside the metrics."""
    run = train(tmp_path, "--max_steps", "4", "--profile_steps", "2", "--profile_warmup_steps", "1",
                "--save_strategy", "no", "--save_final_model", "false")
    report = (tmp_path / "profile_rank0.md").read_text()
    assert report.startswith("Profile of steps 2-3 (2 steps profiled), rank 0, world size 1")
    what = "kernels" if torch.cuda.is_available() else "CPU ops"  # CPU ops stand in for kernels on a CPU
    for row in ["| wall |", f"| compute {what} |", f"| communication {what} |", "| GEMM (cuBLAS / grouped) |",
                "| kernel | calls/step |"]:
        assert row in report, row
    assert "Optimizer.step#" not in report.split("left out.")[1]  # the annotation around the optimizer's ops
    assert "profile of steps 2-3, rank 0: wall" in run.stdout

"""bench/host_samples.py on hand-made py-spy raw output (`thread;frame;...;frame count` lines)."""
from bench.host_samples import parse, step_samples, tables

MAIN, AUTOGRAD = "thread (898): MainThread", "thread (1663)"
RAW = f"""\
{MAIN};<module> (bench/train_step.py:294);load_model (sft/model.py:119) 50
{MAIN};<module> (bench/train_step.py:294);run_one.<locals>.train_step (bench/train_step.py:171);forward (transformers/models/qwen3_moe/modeling_qwen3_moe.py:332);rms_norm_forward (liger_kernel/ops/rms_norm.py:483) 30
{MAIN};<module> (bench/train_step.py:294);run_one.<locals>.train_step (bench/train_step.py:171);forward (transformers/models/qwen3_moe/modeling_qwen3_moe.py:332) 10
{MAIN};<module> (bench/train_step.py:294);run_one.<locals>.train_step (bench/train_step.py:171);Autotuner._bench (triton/runtime/autotuner.py:150) 400
thread (898);<module> (bench/train_step.py:1);_find_and_load (<frozen importlib._bootstrap>:1360) 7
{AUTOGRAD};_backward (monkey_patch/scattermoe/ops.py:265) 20
{AUTOGRAD} 5
"""


def test_step_samples_leave_out_setup_and_autotuning():
    """Also the main thread's samples from before py-spy learnt its name (`thread (898)`, the imports)."""
    kept = step_samples(parse(RAW.splitlines()), "train_step")
    assert sum(s.count for s in kept) == 30 + 10 + 20 + 5


def test_tables_split_own_and_inclusive_time_per_thread():
    text = tables(step_samples(parse(RAW.splitlines()), "train_step"))
    assert f"### {MAIN}: 40 samples" in text and f"### {AUTOGRAD}: 25 samples" in text
    assert "| 30 | 75.0% | `rms_norm_forward [rms_norm.py:483]` |" in text  # own time, innermost frame
    assert "| 40 | 100.0% | `forward [modeling_qwen3_moe.py:332]` |" in text  # inclusive
    assert "| 5 | 20.0% | `(native code only)` |" in text

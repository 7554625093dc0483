"""The step-time accounting of sft/profiling.py (train.py --profile_steps, bench/train_step.py --profile), the profiler
window of sft/callbacks.py, and the call-site grouping of sft/host_syncs.py, on a CPU."""
import logging
import time
import traceback
from types import SimpleNamespace

import pytest
import torch
import transformers
from torch.profiler import profile, record_function

from sft.callbacks import ProfilerCallback
from sft.host_syncs import caller_frames, record_host_syncs
from sft.profiling import COMMUNICATION, GROUP_NAMES, is_user_annotation, profile_report, profiler_activities, \
    summarize
from tests.conftest import REPO_ROOT

SLEEP_S = 0.05  # inside a record_function region: its self time, which no op accounts for


def profiled_matmuls(steps: int = 2):
    """A CPU profile of `steps` steps of a few matmuls and a sleep inside a `record_function` region; its wall."""
    a = torch.randn(128, 128)
    with profile(activities=profiler_activities(cuda=False)) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            with record_function("step_region"):
                (a @ a @ a).relu().sum()
                time.sleep(SLEEP_S)
        wall = time.perf_counter() - start
    return prof, steps, wall


def kernel(key, ms, count=1, annotation=False, device="DeviceType.CUDA"):
    """An event as `key_averages()` gives it (the fields summarize reads), device time in ms."""
    return SimpleNamespace(key=key, count=count, device_type=device, is_user_annotation=annotation,
                           self_device_time_total=ms * 1e3, self_cpu_time_total=0.0)


def test_report_rows_on_a_cpu_profile():
    report = profile_report(*profiled_matmuls())
    for row in ["| wall |", "| compute CPU ops |", "| communication CPU ops |",
                "| outside CPU ops (wall - compute CPU ops) |", "| `aten::mm` |", "| kernel | calls/step |"]:
        assert row in report, row
    for group in GROUP_NAMES:
        assert f"| {group} |" in report, group
    assert "step_region" not in report  # a user annotation, not an op


def test_a_record_function_region_is_not_counted_as_an_op():
    """The region's self time (the sleep) is no op's; counting it, as the old bench table did, put the whole sleep in
    the grouped total."""
    prof, steps, wall = profiled_matmuls()
    breakdown = summarize(prof.key_averages(), steps, wall)
    op_ms = sum(e.self_cpu_time_total for e in prof.key_averages() if not e.is_user_annotation) / 1e3 / steps
    assert breakdown.compute_ms == pytest.approx(op_ms)
    assert breakdown.compute_ms < SLEEP_S * 1e3 / 2  # a few 128x128 matmuls take well under a millisecond
    assert breakdown.idle_ms > SLEEP_S * 1e3 * 0.9


def test_gpu_annotations_are_left_out_and_communication_is_apart():
    """The H200 case: `Optimizer.step#AdamW.step` spans the multi_tensor_apply kernels it wraps, with the same device
    time; counted, the optimizer group doubled. ProfilerStep# is caught by name when the flag is missing."""
    step = kernel("ProfilerStep#7", 100.0)
    del step.is_user_annotation  # a torch without the flag
    events = [kernel("multi_tensor_apply_kernel", 29.0), kernel("Optimizer.step#AdamW.step", 29.0, annotation=True),
              kernel("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT", 40.0, count=6), step,
              kernel("ncclDevKernel_ReduceScatter_Sum_bf16_RING_LL", 30.0),
              kernel("aten::mm", 0.0, device="DeviceType.CPU")]  # a CPU op: its time is the kernel's
    breakdown = summarize(events, steps=2, wall_seconds=0.1)
    assert breakdown.on_gpu
    assert breakdown.group_ms["optimizer"] == pytest.approx(29.0 / 2)
    assert breakdown.group_ms["GEMM (cuBLAS / grouped)"] == pytest.approx(40.0 / 2)
    assert breakdown.communication_ms == pytest.approx(30.0 / 2) == breakdown.group_ms[COMMUNICATION]
    assert breakdown.compute_ms == pytest.approx((29.0 + 40.0) / 2)
    assert breakdown.wall_ms == pytest.approx(50.0)
    assert breakdown.idle_ms == pytest.approx(50.0 - 34.5)  # communication may overlap: not subtracted
    assert [name for name, _, _ in breakdown.top] == ["nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT",
                                                      "ncclDevKernel_ReduceScatter_Sum_bf16_RING_LL",
                                                      "multi_tensor_apply_kernel"]
    report = breakdown.markdown()
    assert "| GPU idle (wall - compute kernels) | 15.50 |" in report and "| compute kernels | 34.50 |" in report
    assert summarize(events, steps=2, wall_seconds=0.01).idle_ms == 0.0  # clipped: kernels of streams overlap


@pytest.mark.parametrize("key, annotation", [("Optimizer.zero_grad#AdamW.zero_grad", False),
                                             ("ProfilerStep#12", False), ("FSDP::all_gather", True),
                                             ("ncclDevKernel_AllGather_RING_LL", False), ("aten::mm", False)])
def test_is_user_annotation(key, annotation):
    flagged = SimpleNamespace(key=key, is_user_annotation=annotation)
    assert is_user_annotation(flagged) == (annotation or key.startswith(("Optimizer.", "ProfilerStep#")))


def run_callback(callback, steps: int, output_dir) -> None:
    """Drive the callback through `steps` optimizer steps the way Trainer calls it."""
    args = SimpleNamespace(output_dir=str(output_dir))
    state = SimpleNamespace(global_step=0, is_world_process_zero=True)
    callback.on_train_begin(args, state, None)
    for _ in range(steps):
        callback.on_step_begin(args, state, None)
        torch.randn(64, 64) @ torch.randn(64, 64)
        state.global_step += 1
        callback.on_step_end(args, state, None)
    callback.on_train_end(args, state, None)


def test_profiler_window_cut_short_by_the_end_of_training(tmp_path):
    run_callback(ProfilerCallback(steps=5, warmup_steps=1), steps=3, output_dir=tmp_path)
    report = (tmp_path / "profile_rank0.md").read_text()
    assert report.startswith("Profile of steps 2-3 (2 steps profiled), rank 0, world size 1")
    assert "| `aten::mm` | 1 |" in report


def test_profiler_without_warm_up_profiles_from_the_first_step(tmp_path):
    run_callback(ProfilerCallback(steps=2, warmup_steps=0), steps=4, output_dir=tmp_path)
    assert (tmp_path / "profile_rank0.md").read_text().startswith("Profile of steps 1-2 (2 steps profiled)")


@pytest.mark.parametrize("steps", [2, 3])  # ends inside the warm-up; ends right after it
def test_nothing_profiled_is_logged_not_written(tmp_path, caplog, steps):
    with caplog.at_level(logging.WARNING):
        run_callback(ProfilerCallback(steps=2, warmup_steps=3), steps=steps, output_dir=tmp_path)
    assert not (tmp_path / "profile_rank0.md").exists()
    assert "nothing profiled" in caplog.text


def test_host_sync_sites_skip_torch_frames():
    torch_file = torch.__file__.replace("__init__.py", "_tensor.py")
    trainer_file = transformers.__file__.replace("__init__.py", "trainer.py")  # under site-packages, in sys.path
    stack = [traceback.FrameSummary(f, n, name) for f, n, name in [
        (f"{REPO_ROOT}/train.py", 90, "main"), (trainer_file, 1850, "training_step"),
        (f"{REPO_ROOT}/bench/train_step.py", 150, "train_step"), (torch_file, 600, "backward"),
        (torch_file, 700, "item")]]
    assert caller_frames(stack, depth=2) == ("torch/_tensor.py:backward",  # the torch call, then innermost first
                                             "bench/train_step.py:150 train_step",
                                             "transformers/trainer.py:1850 training_step")
    assert caller_frames(stack[:3], depth=1) == ("-", "bench/train_step.py:150 train_step")  # a C++ op called directly


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal; the GPU runs bench/train_step.py --sync_debug")
def test_host_syncs_need_cuda():
    with pytest.raises(RuntimeError, match="needs CUDA"):
        record_host_syncs(lambda: None)

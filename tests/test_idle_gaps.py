"""bench/idle_gaps.py on a hand-made chrome trace (the events torch.profiler writes for a GPU run: kernels per stream,
launches with correlation ids, host ops and Python frames), and on a real CPU trace (no kernels)."""
import gzip
import json

import torch

from bench.idle_gaps import find_gaps, gap_table, load_trace

HOST = dict(pid=1, tid=1)


def kernel(ts, dur, correlation, stream=7):
    return dict(ph="X", cat="kernel", name=f"k{correlation}", pid=0, tid=stream, ts=ts, dur=dur,
                args={"correlation": correlation})


def launch(ts, correlation, name="cudaLaunchKernel"):
    return dict(ph="X", cat="cuda_runtime", name=name, ts=ts, dur=2, args={"correlation": correlation}, **HOST)


def host(cat, name, ts, dur):
    return dict(ph="X", cat=cat, name=name, ts=ts, dur=dur, **HOST)


TRACE = [
    # busy 0-100 (two streams overlapping: one stretch), then a 50-us gap, busy 150-200, a 3-us gap, busy 203-260,
    # a 40-us gap that follows a host sync, busy 300-400
    kernel(0, 80, 1), kernel(60, 40, 2, stream=8), kernel(150, 50, 3), kernel(203, 57, 4), kernel(300, 100, 5),
    launch(0, 1), launch(5, 2), launch(140, 3), launch(201, 4), launch(295, 5),
    dict(ph="X", cat="cuda_runtime", name="cudaStreamSynchronize", ts=200, dur=70, args={}, **HOST),
    # the host around launch 3: our router, inside an nn.Module call (torch's frames are skipped)
    host("python_function", "monkey_patch/scattermoe/experts.py(60): scattermoe_experts_forward", 100, 60),
    host("python_function", "transformers/models/qwen3_moe/modeling_qwen3_moe.py(300): forward", 120, 30),
    host("python_function", "torch/nn/modules/module.py(1751): _call_impl", 130, 15),
    host("cpu_op", "aten::topk", 135, 8),
    # around launch 5: liger's loss
    host("python_function", "liger_kernel/ops/fused_linear_cross_entropy.py(420): backward", 290, 10),
    host("cpu_op", "aten::mul", 293, 4),
]


def test_gaps_are_found_merged_over_streams_and_blamed_on_the_launch_that_ends_them():
    gaps, window = find_gaps(TRACE, min_gap_us=5)
    assert window == 400
    assert [(g.start, g.end) for g in gaps] == [(100, 150), (260, 300)]  # the 3-us gap is under the threshold
    first, second = gaps
    assert first.blame == ("aten::topk", "modeling_qwen3_moe.py:300 forward", "experts.py:60 scattermoe_experts_forward")
    assert not first.after_sync
    assert second.blame == ("aten::mul", "fused_linear_cross_entropy.py:420 backward") and second.after_sync


def test_table_sums_idle_by_blame():
    table = gap_table(*find_gaps(TRACE, min_gap_us=5))
    assert table.startswith("GPU idle in gaps: 0.09 ms of a 0.40-ms window (22.5%), 2 gaps; 0.04 ms of it right after")
    assert "| 0.05 | 1 | 0 | `aten::topk` | `modeling_qwen3_moe.py:300 forward` <- `experts.py:60" in table


def test_a_launch_missing_from_the_trace_is_said(tmp_path):
    gaps, _ = find_gaps([kernel(0, 10, 1), kernel(50, 10, 2)])
    assert gaps[0].blame == ("(launch not in the trace)",)


def test_reads_a_real_cpu_trace_gzipped(tmp_path):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
        torch.nn.Linear(8, 8)(torch.randn(4, 8)).sum().backward()
    raw = tmp_path / "trace.json"
    prof.export_chrome_trace(str(raw))
    packed = tmp_path / "trace.json.gz"
    with gzip.open(packed, "wt") as file:
        file.write(raw.read_text())
    events = load_trace(str(packed))
    assert any(e.get("cat") == "python_function" for e in events)  # the stacks the blame reads are there
    assert gap_table(*find_gaps(events)) == "no GPU kernels in the trace: nothing to measure (a CPU trace?)"
    assert json.loads(raw.read_text())["traceEvents"]

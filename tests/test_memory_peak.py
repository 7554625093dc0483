"""bench/memory_peak.py: on a hand-made chrome trace (the profiler's `[memory]` instant events with the ops and Python
frames around them, forward thread and autograd thread), and on a real CPU trace of a small backward."""
import json

import torch
from torch.profiler import ProfilerActivity, profile

from bench.idle_gaps import load_trace
from bench.memory_peak import find_peak, peak_table

MIB = 2 ** 20
FORWARD, BACKWARD = dict(pid=1, tid=1), dict(pid=1, tid=2)
TOTAL = {"now": 100 * MIB}  # allocated before the recording


def memory(ts, addr, nbytes, thread=FORWARD):
    TOTAL["now"] += nbytes
    return dict(ph="i", cat="cpu_instant_event", name="[memory]", ts=ts, **thread,
                args={"Total Allocated": TOTAL["now"], "Bytes": nbytes, "Addr": addr, "Device Type": 1,
                      "Device Id": 0})


def host(cat, name, ts, dur, thread=FORWARD):
    return dict(ph="X", cat=cat, name=name, ts=ts, dur=dur, **thread)


TRACE = [
    host("python_function", "monkey_patch/scattermoe/ops.py(172): experts_fwd", 0, 100),
    host("python_function", "torch/autograd/function.py(596): apply", 5, 90),
    host("cpu_op", "aten::empty", 10, 5),
    memory(12, 1, 4 * MIB),                                   # our forward: lives through the peak
    host("python_function", "liger_kernel/ops/fused_linear_cross_entropy.py(90): forward", 200, 100),
    host("cpu_op", "aten::mm", 210, 20),
    memory(215, 2, 2 * MIB),                                  # freed before the peak
    memory(220, 2, -2 * MIB),
    memory(225, 99, -1 * MIB),                                # a tensor older than the recording, freed
    memory(230, 3, 8 * MIB),                                  # outside any op: "(no op)" and the loss frame
    host("cpu_op", f"autograd::engine::evaluate_function: MmBackward0", 300, 50, BACKWARD),
    host("cpu_op", "aten::mm", 310, 10, BACKWARD),
    memory(315, 4, 6 * MIB, BACKWARD),                        # the backward: 4+8+6-1 = 17 MiB at the peak
    memory(400, 3, -8 * MIB),                                 # after the peak: does not count
    memory(410, 5, 5 * MIB),
]


def test_peak_holds_the_blocks_live_at_the_largest_total():
    peak = find_peak(TRACE)
    assert (peak.peak, peak.before, peak.before_freed, peak.made_in_step) == (117 * MIB, 100 * MIB, MIB, 18 * MIB)
    assert peak.live == {
        "`aten::empty` <- `ops.py:172 experts_fwd`": [4 * MIB],  # torch's frame skipped
        "`aten::mm` <- `fused_linear_cross_entropy.py:90 forward`": [8 * MIB],
        "`aten::mm` in the backward of `MmBackward0`": [6 * MIB],
    }


def test_table_accounts_for_the_peak_and_counts_gradient_sized_blocks():
    text = peak_table(find_peak(TRACE), {"parameters": 60 * MIB, "optimizer states": 30 * MIB}, {6 * MIB})
    assert text.startswith("Peak 0.11 GiB allocated = 0.10 GiB of tensors older than the step + 0.02 GiB")
    assert "0.01 GiB are blocks of exactly a trainable parameter's size" in text
    rows = [line.split(" | ")[0].strip("| ") for line in text.splitlines() if line.startswith("| ")][1:]
    assert abs(sum(float(r) for r in rows) - 117 / 1024) < 0.03  # the rows add up to the peak, to their rounding
    assert "| 0.01 | 1 | `aten::mm` in the backward of `MmBackward0` |" in text


def test_a_real_cpu_trace(tmp_path):
    """The profiler's own events (CPU allocations stand in for the GPU's): the peak is the trace's largest total."""
    layer = torch.nn.Linear(256, 256)
    x = torch.randn(512, 256, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, with_stack=True) as prof:
        layer(x).relu().sum().backward()
    prof.export_chrome_trace(str(tmp_path / "trace.json"))
    events = load_trace(str(tmp_path / "trace.json"), instants=True)
    peak = find_peak(events, device_type=0)
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"
              and e["args"]["Device Type"] == 0]
    assert peak.peak == max(totals) and peak.made_in_step >= 512 * 256 * 4  # the layer's output at least
    assert any("backward of" in who for who in peak.live), peak.live
    assert "no device allocations" in peak_table(find_peak(events, device_type=1), {})

"""bench/memory_peak.py on a hand-made CUDA allocator trace (the events `torch.cuda.memory._snapshot()` lists per
device: alloc / free_requested / free_completed with addresses, sizes and Python frames, innermost first)."""
from bench.memory_peak import NO_FRAME, find_peak, name_gradients, peak_table

MIB = 2 ** 20


def frames(*names):
    return [{"filename": f"/site-packages/{path}", "line": line, "name": name} for path, line, name in names]


TORCH = ("torch/nn/modules/module.py", 1751, "_call_impl")
EXPERTS = ("monkey_patch/scattermoe/ops.py", 120, "forward")
LAYER = ("transformers/models/qwen3_moe/modeling_qwen3_moe.py", 300, "forward")
LOSS = ("liger_kernel/ops/fused_linear_cross_entropy.py", 90, "fused_linear_cross_entropy_forward")


def event(action, addr, size, *where):
    return {"action": action, "addr": addr, "size": size, "frames": frames(*where)}


TRACE = [
    event("alloc", 1, 4 * MIB, TORCH, EXPERTS, LAYER),       # lives through the peak
    event("alloc", 2, 2 * MIB, LOSS),                        # freed before the peak
    event("free_requested", 2, 2 * MIB),
    event("free_completed", 2, 2 * MIB),
    event("free_completed", 99, 1 * MIB),                    # a tensor older than the recording
    event("alloc", 3, 8 * MIB, LOSS),                        # at the peak
    event("alloc", 4, 6 * MIB),                              # frameless, a parameter's size: a gradient
    event("alloc", 5, 1 * MIB),                              # frameless, no parameter of that size
    event("free_completed", 3, 8 * MIB),                     # after the peak: does not count
    event("alloc", 6, 5 * MIB, EXPERTS),                     # net 4+8+6+1-1 = 18 MiB at the peak; 15 here
]


def test_peak_holds_the_tensors_live_at_the_largest_net_growth():
    peak = find_peak(TRACE, before=100 * MIB)
    assert peak.peak == 100 * MIB + 18 * MIB
    assert peak.before_freed == 1 * MIB
    assert peak.made_in_step == 19 * MIB
    assert sorted(peak.live) == sorted([
        "ops.py:120 forward <- modeling_qwen3_moe.py:300 forward",  # torch's frame skipped, innermost first
        "fused_linear_cross_entropy.py:90 fused_linear_cross_entropy_forward", NO_FRAME])
    assert sorted(peak.live[NO_FRAME]) == [1 * MIB, 6 * MIB]


def test_frameless_blocks_of_a_parameters_size_are_named_gradients():
    peak = name_gradients(find_peak(TRACE, before=100 * MIB), {6 * MIB: 1, 3 * MIB: 2})
    assert peak.live["parameter gradients (frameless, a parameter's size)"] == [6 * MIB]
    assert peak.live[NO_FRAME] == [1 * MIB]


def test_table_accounts_for_every_byte_of_the_peak():
    peak = name_gradients(find_peak(TRACE, before=100 * MIB), {6 * MIB: 1})
    text = peak_table(peak, {"parameters": 60 * MIB, "optimizer states": 30 * MIB})
    assert text.startswith("Peak 0.12 GiB allocated = 0.10 GiB of tensors older than the step + 0.02 GiB")
    rows = [line.split(" | ")[0].strip("| ") for line in text.splitlines()[4:]]
    assert abs(sum(float(r) for r in rows) - 118 / 1024) < 0.02  # the rows sum to the peak, to their rounding
    assert "| 0.01 | 1 | `fused_linear_cross_entropy.py:90" in text

"""What is on the GPU at a step's memory peak: a CUDA allocator trace replayed, the live tensors grouped by who made them.

  python bench/train_step.py --stacks ours --memory     # records one step, then prints this table

`torch.cuda.memory._record_memory_history` logs every allocation and free of the caching allocator with the Python
frames that made it. Replaying that log gives the allocated bytes after every event; at the largest value, the
allocations still live are what the peak is made of. Tensors allocated before the recording began (parameters,
optimizer states) are one line: `before`, the bytes allocated when it began, less those of them freed before the peak.
Allocations without a Python frame come from autograd's C++ engine: gradients accumulated into `.grad` and the
backward of built-in ops; those whose size is a parameter's are named as that parameter's gradient, the likeliest
owner.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

LIBRARY_FRAMES = ("torch/", "<frozen", "threading.py", "contextlib.py", "functools.py")
NO_FRAME = "(no Python frame: autograd's C++ engine)"
ROUNDING = 512  # the caching allocator rounds every block up to a multiple of 512 bytes


def rounded(nbytes: int) -> int:
    return -(-nbytes // ROUNDING) * ROUNDING


@dataclass
class Peak:
    before: int  # bytes allocated when the recording began
    peak: int  # before + the largest net growth seen in the trace
    before_freed: int  # of `before`, bytes freed by the time of the peak
    live: dict[str, list[int]] = field(default_factory=dict)  # blame -> sizes of the live blocks it made

    @property
    def made_in_step(self) -> int:
        return sum(sum(sizes) for sizes in self.live.values())


def blame(frames: list[dict], depth: int = 2) -> str:
    """The innermost `depth` frames outside torch and the standard library, innermost first."""
    ours = [f for f in frames if not f.get("filename", "").split("site-packages/")[-1].startswith(LIBRARY_FRAMES)
            and "/torch/" not in f.get("filename", "")]
    if not ours:
        return NO_FRAME
    return " <- ".join(f"{f['filename'].rsplit('/', 1)[-1]}:{f['line']} {f['name']}" for f in ours[:depth])


def find_peak(trace: list[dict], before: int) -> Peak:
    """Replay one device's allocator trace (`_snapshot()["device_traces"][i]`) from `before` allocated bytes."""
    actions = [e for e in trace if e["action"] in ("alloc", "free_completed")]
    net, best, best_at = 0, 0, -1
    for i, e in enumerate(actions):
        net += e["size"] if e["action"] == "alloc" else -e["size"]
        if net > best:
            best, best_at = net, i
    live: dict[int, dict] = {}
    before_freed = 0
    for e in actions[:best_at + 1]:
        if e["action"] == "alloc":
            live[e["addr"]] = e
        elif live.pop(e["addr"], None) is None:  # allocated before the recording began
            before_freed += e["size"]
    grouped: dict[str, list[int]] = defaultdict(list)
    for e in live.values():
        grouped[blame(e.get("frames", []))].append(e["size"])
    return Peak(before, before + best, before_freed, dict(grouped))


def name_gradients(peak: Peak, parameter_sizes: dict[int, int]) -> Peak:
    """Split the frameless group: blocks whose size is some parameter's (`{rounded bytes: count}`) are gradients."""
    frameless = peak.live.pop(NO_FRAME, [])
    remaining = dict(parameter_sizes)
    for size in frameless:
        if remaining.get(size, 0) > 0:
            remaining[size] -= 1
            peak.live.setdefault("parameter gradients (frameless, a parameter's size)", []).append(size)
        else:
            peak.live.setdefault(NO_FRAME, []).append(size)
    return peak


def peak_table(peak: Peak, known_before: dict[str, int], top: int = 20) -> str:
    """Markdown: the peak, then what it holds. `known_before`: named parts of `before` (parameters, optimizer state)."""
    gib = 2 ** 30
    lines = [f"Peak {peak.peak / gib:.2f} GiB allocated = {(peak.before - peak.before_freed) / gib:.2f} GiB of tensors "
             f"older than the step + {peak.made_in_step / gib:.2f} GiB made during it.", "",
             "| GiB | blocks | what (innermost frames outside torch, innermost first) |", "|---|---|---|"]
    unnamed = peak.before - sum(known_before.values())
    for name, nbytes in [*known_before.items(), ("other tensors older than the step", unnamed)]:
        lines.append(f"| {nbytes / gib:.2f} | | {name} (before the step) |")
    if peak.before_freed:
        lines.append(f"| -{peak.before_freed / gib:.2f} | | of those, freed before the peak |")
    for who, sizes in sorted(peak.live.items(), key=lambda kv: -sum(kv[1]))[:top]:
        lines.append(f"| {sum(sizes) / gib:.2f} | {len(sizes)} | `{who}` |")
    return "\n".join(lines)


def record_peak(step, model, optimizer) -> str:
    """Run `step()` once with the allocator trace on (CUDA only) and return `peak_table` for it."""
    import torch

    parameters = list(model.parameters())
    states = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.is_cuda]
    known = {"parameters": sum(rounded(p.nbytes) for p in parameters),
             "optimizer states": sum(rounded(t.nbytes) for t in states)}
    sizes: dict[int, int] = defaultdict(int)
    for p in parameters:
        if p.requires_grad:
            sizes[rounded(p.nbytes)] += 1
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
    try:
        step()
        torch.cuda.synchronize()
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    trace = snapshot["device_traces"][torch.cuda.current_device()]
    return peak_table(name_gradients(find_peak(trace, before), dict(sizes)), known)

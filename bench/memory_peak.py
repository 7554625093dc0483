"""What is on the GPU at a step's memory peak: the profiler's allocation events replayed, live blocks grouped by maker.

  python bench/train_step.py --stacks ours --memory     # records one step, then prints this table

`torch.profiler.profile(profile_memory=True, with_stack=True)` writes a `[memory]` event for every allocation and
free of the device's caching allocator, with the bytes allocated after it ("Total Allocated"). The event with the
largest total is the peak; the blocks allocated before it and not yet freed are what the step added to it, each
blamed on the op around its allocation and, in the forward, the Python frames around that op (the backward runs on
autograd's own thread, whose ops are named `autograd::engine::evaluate_function: <Node>`). The tensors older than the
recording (parameters, optimizer states) are one line, less those of them the step freed before its peak.

(The allocator's own history, `torch.cuda.memory._record_memory_history(stacks="python")`, would need no profiler,
but on the H200 with torch 2.11 it broke our step and the peer's alike: `SystemError: <built-in method apply of
FunctionMeta object> returned NULL without setting an exception`, raised from an autograd Function.)
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from bench.idle_gaps import HostTimeline, frame_name, HOST_LIBRARY_FRAMES

BACKWARD_NODE = "autograd::engine::evaluate_function: "


@dataclass
class Peak:
    peak: int  # bytes allocated at the peak
    before: int  # bytes allocated when the recording began
    before_freed: int  # of `before`, bytes the step freed by the time of its peak
    live: dict[str, list[int]] = field(default_factory=dict)  # blame -> sizes of the live blocks it made

    @property
    def made_in_step(self) -> int:
        return sum(sum(sizes) for sizes in self.live.values())


def memory_events(events: list[dict], device_type: int = 1) -> list[dict]:
    """The `[memory]` events of one device type (1: CUDA, 0: CPU), in time order."""
    found = [e for e in events if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == device_type]
    return sorted(found, key=lambda e: (e["ts"], e["args"].get("Ev Idx", 0)))


def blame(host: HostTimeline, event: dict, depth: int = 2) -> str:
    """`op` in the backward of `Node`, or `op` <- the innermost Python frames outside torch around the allocation."""
    around = host.enclosing((event.get("pid"), event.get("tid")), event["ts"])
    ops = [e["name"] for e in around if e.get("cat") == "cpu_op"]
    op = next((name for name in ops if not name.startswith(BACKWARD_NODE)), "(no op)")
    node = next((name[len(BACKWARD_NODE):] for name in ops if name.startswith(BACKWARD_NODE)), None)
    if node:
        return f"`{op}` in the backward of `{node}`"
    frames = [frame_name(e) for e in around if e.get("cat") == "python_function"
              and not e["name"].startswith(HOST_LIBRARY_FRAMES)][:depth]
    return " <- ".join([f"`{op}`", *(f"`{f}`" for f in frames)])


def find_peak(events: list[dict], device_type: int = 1) -> Peak:
    """Replay the allocations of a chrome trace (loaded with `bench.idle_gaps.load_trace(..., instants=True)`)."""
    memory = memory_events(events, device_type)
    if not memory:
        return Peak(0, 0, 0)
    totals = [e["args"]["Total Allocated"] for e in memory]
    at = max(range(len(memory)), key=totals.__getitem__)
    before = totals[0] - memory[0]["args"]["Bytes"]
    live: dict[int, dict] = {}
    before_freed = 0
    for e in memory[:at + 1]:
        nbytes, addr = e["args"]["Bytes"], e["args"]["Addr"]
        if nbytes > 0:
            live[addr] = e
        elif live.pop(addr, None) is None:  # allocated before the recording began
            before_freed -= nbytes
    host = HostTimeline(events)
    grouped: dict[str, list[int]] = defaultdict(list)
    for e in live.values():
        grouped[blame(host, e)].append(e["args"]["Bytes"])
    return Peak(totals[at], before, before_freed, dict(grouped))


def peak_table(peak: Peak, known_before: dict[str, int], parameter_sizes: set[int] = frozenset(),
               top: int = 20) -> str:
    """Markdown: the peak and what it holds. `known_before`: named parts of the older tensors (parameters, optimizer
    states); `parameter_sizes`: byte sizes of the trainable parameters, to count the blocks that are likely gradients."""
    gib = 2 ** 30
    if not peak.peak:
        return "no device allocations in the trace: nothing to measure (a CPU run?)"
    lines = [f"Peak {peak.peak / gib:.2f} GiB allocated = {(peak.before - peak.before_freed) / gib:.2f} GiB of tensors "
             f"older than the step + {peak.made_in_step / gib:.2f} GiB allocated during it.", ""]
    if parameter_sizes:
        like = sum(size for sizes in peak.live.values() for size in sizes if size in parameter_sizes)
        lines += [f"Of the latter, {like / gib:.2f} GiB are blocks of exactly a trainable parameter's size "
                  f"(gradients, most likely).", ""]
    lines += ["| GiB | blocks | what |", "|---|---|---|"]
    unnamed = peak.before - sum(known_before.values())
    for name, nbytes in [*known_before.items(), ("other tensors older than the step", unnamed)]:
        lines.append(f"| {nbytes / gib:.2f} | | {name} (before the step) |")
    if peak.before_freed:
        lines.append(f"| -{peak.before_freed / gib:.2f} | | of those, freed by the step before its peak |")
    for who, sizes in sorted(peak.live.items(), key=lambda kv: -sum(kv[1]))[:top]:
        lines.append(f"| {sum(sizes) / gib:.2f} | {len(sizes)} | {who} |")
    rest = sorted(peak.live.items(), key=lambda kv: -sum(kv[1]))[top:]
    if rest:
        lines.append(f"| {sum(sum(s) for _, s in rest) / gib:.2f} | {sum(len(s) for _, s in rest)} | "
                     f"{len(rest)} smaller groups |")
    return "\n".join(lines)


def record_peak(step, model, optimizer) -> str:
    """Run `step()` once under the profiler's memory recording (CUDA) and return `peak_table` for it."""
    import os
    import tempfile

    import torch
    from torch.profiler import ProfilerActivity, profile

    from bench.idle_gaps import load_trace

    trainable = [p for p in model.parameters() if p.requires_grad]
    states = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.is_cuda]
    known = {"parameters": sum(p.nbytes for p in model.parameters()),
             "optimizer states": sum(t.nbytes for t in states)}
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], profile_memory=True,
                 with_stack=True) as prof:
        step()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "memory.json")
        prof.export_chrome_trace(path)
        events = load_trace(path, instants=True)
    return peak_table(find_peak(events), known, {p.nbytes for p in trainable})

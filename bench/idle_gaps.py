"""Where the GPU waits for the host: idle gaps of a torch.profiler chrome trace, each blamed on the launch that ended it.

  python bench/idle_gaps.py trace_ours.json.gz [--min_gap_us 5] [--top 25]
  python bench/train_step.py --stacks ours --trace     # records one step with Python stacks, then prints this table

A gap is a stretch in which no kernel, copy or memset runs on the device (all streams merged). The kernel that ends
a gap was launched at some moment on the host; what the host was doing there, the innermost op and Python frames
around that launch (the trace must be recorded `with_stack=True`), is what the GPU was waiting for: a slow chain of
small launches, or a host sync (a synchronizing runtime call that ends inside the gap: the host waited for the GPU,
then had to launch again from an empty queue). Gaps are summed by that blame, largest first.
"""
from __future__ import annotations

import argparse
import bisect
import gzip
import json
from collections import defaultdict
from dataclasses import dataclass

DEVICE_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}
LAUNCH_CATEGORIES = {"cuda_runtime", "cuda_driver"}
SYNC_CALLS = ("Synchronize", "cudaMemcpy", "cuMemcpyDtoH")  # cudaMemcpyAsync to the host blocks too
HOST_LIBRARY_FRAMES = ("torch/", "<built-in", "threading.py", "contextlib.py", "functools.py")


@dataclass
class Gap:
    start: float  # us
    end: float
    blame: tuple[str, ...]  # (op around the launch, innermost Python frames outside torch...)
    after_sync: bool

    @property
    def us(self) -> float:
        return self.end - self.start


def load_trace(path: str, instants: bool = False) -> list[dict]:
    """The complete events ("X": ops, frames, kernels, launches) of a chrome trace; with `instants`, also the instant
    events ("i": the profiler's `[memory]` records)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as file:
        trace = json.load(file)
    kept = ("X", "i") if instants else ("X",)
    return [e for e in (trace["traceEvents"] if isinstance(trace, dict) else trace) if e.get("ph") in kept]


def busy_intervals(device_events: list[dict]) -> list[tuple[float, float]]:
    """Union of the device events' [start, end), all streams together."""
    merged: list[list[float]] = []
    for e in sorted(device_events, key=lambda e: e["ts"]):
        start, end = e["ts"], e["ts"] + e.get("dur", 0)
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e) for s, e in merged]


class HostTimeline:
    """The host events of each thread, to ask what enclosed a moment: the innermost op, the Python frames."""

    def __init__(self, events: list[dict]):
        self.by_thread: dict[tuple, list[dict]] = defaultdict(list)
        for e in events:
            if e.get("cat") in ("cpu_op", "python_function"):
                self.by_thread[(e.get("pid"), e.get("tid"))].append(e)
        for thread_events in self.by_thread.values():
            thread_events.sort(key=lambda e: e["ts"])

    def enclosing(self, thread: tuple, moment: float) -> list[dict]:
        """Events of `thread` that contain `moment`, innermost (latest start) first."""
        events = self.by_thread.get(thread, [])
        starts = [e["ts"] for e in events]
        inside = [e for e in events[:bisect.bisect_right(starts, moment)] if e["ts"] + e.get("dur", 0) >= moment]
        return sorted(inside, key=lambda e: -e["ts"])


def frame_name(python_event: dict) -> str:
    """`transformers/models/qwen3_moe/modeling_qwen3_moe.py(312): forward` -> `...modeling_qwen3_moe.py:312 forward`."""
    name = python_event["name"]
    if "(" in name and "): " in name:
        path, rest = name.split("(", 1)
        line, function = rest.split("): ", 1)
        return f"{path.rsplit('/', 1)[-1]}:{line} {function}"
    return name


def blame_of_launch(host: HostTimeline, launch: dict | None, depth: int = 2) -> tuple[str, ...]:
    if launch is None:
        return ("(launch not in the trace)",)
    around = host.enclosing((launch.get("pid"), launch.get("tid")), launch["ts"])
    op = next((e["name"] for e in around if e.get("cat") == "cpu_op"), "(no op)")
    frames = [frame_name(e) for e in around if e.get("cat") == "python_function"
              and not e["name"].startswith(HOST_LIBRARY_FRAMES)][:depth]
    return (op, *frames)


def find_gaps(events: list[dict], min_gap_us: float = 5.0) -> tuple[list[Gap], float]:
    """Gaps of at least `min_gap_us` between the first and the last device event, and that window's length."""
    device = [e for e in events if e.get("cat") in DEVICE_CATEGORIES]
    if not device:
        return [], 0.0
    busy = busy_intervals(device)
    launches = {e.get("args", {}).get("correlation"): e for e in events if e.get("cat") in LAUNCH_CATEGORIES}
    starting_at = {e["ts"]: e for e in device}  # an event that starts each busy stretch
    syncs = sorted((e["ts"] + e.get("dur", 0)) for e in events
                   if e.get("cat") in LAUNCH_CATEGORIES and any(s in e["name"] for s in SYNC_CALLS))
    host = HostTimeline(events)
    gaps = []
    for (_, end_before), (start_after, _) in zip(busy, busy[1:]):
        if start_after - end_before < min_gap_us:
            continue
        kernel = starting_at.get(start_after)
        launch = launches.get(kernel.get("args", {}).get("correlation")) if kernel else None
        synced = bisect.bisect_left(syncs, end_before) < bisect.bisect_right(syncs, start_after)
        gaps.append(Gap(end_before, start_after, blame_of_launch(host, launch), synced))
    return gaps, busy[-1][1] - busy[0][0]


def gap_table(gaps: list[Gap], window_us: float, top: int = 25) -> str:
    if not window_us:
        return "no GPU kernels in the trace: nothing to measure (a CPU trace?)"
    total = sum(g.us for g in gaps)
    groups: dict[tuple, list[Gap]] = defaultdict(list)
    for g in gaps:
        groups[g.blame].append(g)
    lines = [f"GPU idle in gaps: {total / 1e3:.2f} ms of a {window_us / 1e3:.2f}-ms window ({total / window_us:.1%}), "
             f"{len(gaps)} gaps; {sum(g.us for g in gaps if g.after_sync) / 1e3:.2f} ms of it right after a host "
             "sync.", "",
             "| idle ms | gaps | after a sync | the GPU waited for the launch from (op) | where (innermost Python frames) |",
             "|---|---|---|---|---|"]
    for blame, members in sorted(groups.items(), key=lambda kv: -sum(g.us for g in kv[1]))[:top]:
        op, *frames = blame
        lines.append(f"| {sum(g.us for g in members) / 1e3:.2f} | {len(members)} | "
                     f"{sum(g.after_sync for g in members)} | `{op}` | "
                     f"{' <- '.join(f'`{f}`' for f in frames) or '-'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace", help="a chrome trace from torch.profiler (.json or .json.gz)")
    parser.add_argument("--min_gap_us", type=float, default=5.0)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    gaps, window = find_gaps(load_trace(args.trace), args.min_gap_us)
    print(gap_table(gaps, window, args.top))


if __name__ == "__main__":
    main()

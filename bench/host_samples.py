"""Where the host's time goes in a training step: py-spy's sampled Python stacks, summed per thread and function.

The torch profiler's Python stacks (`bench/train_step.py --trace`) slow every Python call they record, so they
inflate Python-heavy launches (Triton's launcher, Liger's wrappers) against C++ ones. A sampling profiler does not:

  py-spy record -r 250 --threads --nonblocking --format raw -o host.txt -- \\
      python bench/train_step.py --one ours --layers 8 --seq 8192 --steps 16
  python bench/host_samples.py host.txt                 # samples inside the bench's train_step, per thread

Each line of py-spy's raw output is `thread (tid);outer frame;...;inner frame <count>`, a frame being
`function (path:line)`. The forward runs on the main thread; the backward, gradient checkpointing's recompute included,
on autograd's thread. Samples taken while Triton autotunes or compiles are left out (first steps only); a thread
blocked in a host sync (`.item()`, `torch.equal` on GPU tensors) is sampled there, so such lines mean the host waited.
"""
from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import dataclass

SETUP_FRAMES = ("Autotuner._bench", "do_bench", "triton/compiler", "CompiledKernel", "make_launcher")


@dataclass
class Sample:
    thread: str
    frames: list[str]
    count: int


def parse(lines) -> list[Sample]:
    samples = []
    for line in lines:
        line = line.rstrip()
        if not line:
            continue
        stack, count = line.rsplit(" ", 1)
        thread, *frames = stack.split(";")
        samples.append(Sample(thread, frames, int(count)))
    return samples


def short(frame: str) -> str:
    """`forward (transformers/models/qwen3_moe/modeling_qwen3_moe.py:332)` -> `forward [modeling_qwen3_moe.py:332]`."""
    if " (" not in frame:
        return frame
    name, where = frame.split(" (", 1)
    return f"{name} [{where.rstrip(')').rsplit('/', 1)[-1]}]"


def step_samples(samples: list[Sample], within: str) -> list[Sample]:
    """Samples of the step: on threads other than the main one, all (autograd's thread runs nothing else); on the
    main thread, those inside a frame whose function contains `within`; never those of autotuning or compiling."""
    main_ids = {thread_id(s.thread) for s in samples if "MainThread" in s.thread}  # py-spy names it once it can
    kept = []
    for s in samples:
        if any(marker in f for f in s.frames for marker in SETUP_FRAMES):
            continue
        if thread_id(s.thread) not in main_ids or any(within in f.split(" (")[0] for f in s.frames):
            kept.append(s)
    return kept


def thread_id(label: str) -> str:
    """`thread (898): MainThread` -> `898`."""
    return label.split("(", 1)[-1].split(")", 1)[0]


def tables(samples: list[Sample], top: int = 20) -> str:
    lines = []
    for thread in sorted({s.thread for s in samples}):
        mine = [s for s in samples if s.thread == thread]
        total = sum(s.count for s in mine)
        own, inclusive = Counter(), Counter()
        for s in mine:
            own[short(s.frames[-1]) if s.frames else "(native code only)"] += s.count
            for frame in {short(f) for f in s.frames}:
                inclusive[frame] += s.count
        lines += [f"### {thread}: {total} samples", "", "| samples | share | innermost Python frame (its own time) |",
                  "|---|---|---|"]
        lines += [f"| {n} | {n / total:.1%} | `{f}` |" for f, n in own.most_common(top)]
        lines += ["", "| samples | share | frame, with everything it called |", "|---|---|---|"]
        lines += [f"| {n} | {n / total:.1%} | `{f}` |" for f, n in inclusive.most_common(top)]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("samples", help="py-spy record --format raw --threads output")
    parser.add_argument("--within", default="train_step", help="main-thread samples inside this function count")
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    with open(args.samples) as file:
        print(tables(step_samples(parse(file), args.within), args.top))


if __name__ == "__main__":
    main()

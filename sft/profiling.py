"""Where a training step's time goes: torch.profiler events grouped by kernel name, set against the step's wall time.

One accounting for train.py's `--profile_steps` (sft/callbacks.py) and bench/train_step.py's `--profile`:

  wall            measured by the caller around the profiled steps (synchronize, perf_counter, synchronize)
  compute         self device time of every kernel except communication, summed over streams
  communication   NCCL kernels; they run on their own stream and may overlap compute
  GPU idle        wall - compute, clipped at 0: CPU launch overhead, host syncs, data loading, waiting on NCCL;
                  a lower bound when compute kernels of several streams overlap (FSDP2 copies on its own streams)

On a machine without CUDA activity (the CPU tests) the same tables count CPU ops' self time instead of kernels.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

COMMUNICATION = "communication (NCCL)"

# Kernel-name patterns -> where the step's device time goes (the first match wins; the rest is "other").
# Communication comes first: NCCL's kernels (ncclDevKernel_ReduceScatter_Sum_bf16_RING_LL, ncclKernel_AllGather...)
# would otherwise fall into "copies, fills, reductions"; gloo and c10d name the CPU-side collectives.
KERNEL_GROUPS = (
    (COMMUNICATION, r"nccl|gloo|c10d::|all_?gather|reduce_?scatter|all_?reduce|all_?to_?all"),
    ("experts (ours)", r"_gather_matmul|_scatter_matmul|_expert_wgrad|_quantize_kernel|routing"),
    ("attention", r"flash|fmha|varlen|attn|attention|flex"),
    ("optimizer", r"adam|multi_tensor|foreach"),
    ("liger (norm, rope, loss)", r"liger|rms_norm|rope|cross_entropy|_fused_linear"),
    ("GEMM (cuBLAS / grouped)", r"gemm|cutlass|xmma|nvjet|sm90|grouped_mm|matmul|aten::mm|addmm|bmm"),
    ("copies, fills, reductions", r"memcpy|memset|copy|fill|reduce|index|scatter|gather|cat|sort|topk|softmax|"
                                  r"elementwise"),
)
GROUP_NAMES = [name for name, _ in KERNEL_GROUPS] + ["other"]

# Names of the regions that torch itself annotates: the whole step (`profile.step()`) and every optimizer step.
ANNOTATION_KEYS = re.compile(r"^(ProfilerStep#\d+|Optimizer\.(step|zero_grad)#)")


def is_user_annotation(event) -> bool:
    """A `record_function` region rather than an op or a kernel.

    On the GPU such a region's device time is the span of the kernels it wraps: the H200 profile of
    bench/train_step.py counted `Optimizer.step#AdamW.step` (29 ms) on top of its own multi_tensor_apply kernels
    (29 ms). Torch marks these events `is_user_annotation`; the key check is a fallback for a torch that does not.
    """
    return bool(getattr(event, "is_user_annotation", False)) or bool(ANNOTATION_KEYS.match(event.key))


def kernel_group(name: str) -> str:
    return next((group for group, pattern in KERNEL_GROUPS if re.search(pattern, name, re.IGNORECASE)), "other")


def on_device(event) -> bool:
    return str(getattr(event, "device_type", "")).endswith("CUDA")


@dataclass
class StepBreakdown:
    """Per-step milliseconds of `steps` profiled steps. `on_gpu` False: CPU ops stand in for kernels."""
    steps: int
    wall_ms: float
    on_gpu: bool
    group_ms: dict[str, float]
    top: list[tuple[str, float, float]]  # (kernel, calls per step, ms per step), largest first

    @property
    def communication_ms(self) -> float:
        return self.group_ms[COMMUNICATION]

    @property
    def compute_ms(self) -> float:
        return sum(self.group_ms.values()) - self.communication_ms

    @property
    def idle_ms(self) -> float:
        return max(0.0, self.wall_ms - self.compute_ms)

    @property
    def what(self) -> str:
        return "kernels" if self.on_gpu else "CPU ops"

    def rows(self) -> list[tuple[str, float]]:
        idle = "GPU idle (wall - compute kernels)" if self.on_gpu else "outside CPU ops (wall - compute CPU ops)"
        return [("wall", self.wall_ms), (f"compute {self.what}", self.compute_ms),
                (f"communication {self.what}", self.communication_ms), (idle, self.idle_ms)]

    def summary_line(self) -> str:
        return ", ".join(f"{name} {ms:.1f} ms" for name, ms in self.rows()) + f" per step ({self.steps} steps)"

    def markdown(self) -> str:
        wall = self.wall_ms or 1e-9
        total = sum(self.group_ms.values()) or 1e-9
        source = "CUDA kernels" if self.on_gpu else "CPU ops (no CUDA activity was recorded: not a GPU measurement)"
        lines = [f"{self.steps} profiled steps; {source}, self time, user annotations (`ProfilerStep#`, "
                 f"`Optimizer.step#`, `record_function` regions) left out.", "",
                 "| per step | ms | share of wall |", "|---|---|---|"]
        lines += [f"| {name} | {ms:.2f} | {ms / wall:.1%} |" for name, ms in self.rows()]
        lines += ["", "Communication runs on its own stream and may overlap compute: it is not subtracted from the "
                  "idle row, and compute + communication can exceed the wall.", "",
                  f"| group | ms/step | share of {self.what} |", "|---|---|---|"]
        lines += [f"| {group} | {ms:.2f} | {ms / total:.1%} |" for group, ms in self.group_ms.items()]
        lines += ["", "| kernel | calls/step | ms/step | share |", "|---|---|---|---|"]
        lines += [f"| `{name[:90]}` | {calls:g} | {ms:.2f} | {ms / total:.1%} |" for name, calls, ms in self.top]
        return "\n".join(lines)


def summarize(events, steps: int, wall_seconds: float, top: int = 25) -> StepBreakdown:
    """`events`: `profile.key_averages()` (or objects with its fields) over `steps` steps that took `wall_seconds`."""
    events = [e for e in events if not is_user_annotation(e)]
    # On a GPU only kernels count: the CPU ops that launched them would count the same time again.
    on_gpu = any(on_device(e) and e.self_device_time_total > 0 for e in events)
    attribute = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    counted = [e for e in events if getattr(e, attribute) > 0 and (on_device(e) or not on_gpu)]
    group_ms = dict.fromkeys(GROUP_NAMES, 0.0)
    for e in counted:
        group_ms[kernel_group(e.key)] += getattr(e, attribute) / 1e3 / steps
    largest = sorted(counted, key=lambda e: -getattr(e, attribute))[:top]
    return StepBreakdown(steps, wall_seconds * 1e3 / steps, on_gpu, group_ms,
                         [(e.key, e.count / steps, getattr(e, attribute) / 1e3 / steps) for e in largest])


def profile_report(prof, steps: int, wall_seconds: float) -> str:
    """Markdown report of a finished `torch.profiler.profile` over `steps` steps that took `wall_seconds`."""
    return summarize(prof.key_averages(), steps, wall_seconds).markdown()


def profiler_activities(cuda: bool) -> list:
    """CPU ops as well as kernels: they are the report's stand-in without CUDA, and recording them cost no clear time
    on the H200 (4 layers of Qwen3-30B-A3B, ours stack, 8192 tokens, two windows of 3 steps each: 94 ms/step
    unprofiled, 97 and 100 profiled with CPU + CUDA, 94 and 103 with CUDA alone). The profiler's few per cent land in
    the wall and so in GPU idle."""
    from torch.profiler import ProfilerActivity
    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])

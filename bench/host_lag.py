"""Where the GPU waits for the host, measured without a profiler: events at marks through a training step.

At each mark the host enqueues a CUDA event and reads its own clock. Afterwards the events say when the GPU reached
each mark, so per mark:

  lag = (when the GPU reached it) - (when the host enqueued it)   (both from the step's start on the host's clock)

is the work queued ahead of the GPU at that point. Where the lag stays near 0 the GPU had run dry and waited for the
host; where it grows the host runs ahead and the GPU sets the pace. torch.profiler answers the same question less
directly: its Python-stack tracing slowed our host enough to put 43% of a step into GPU idle (bench/results/
train_step_h200_202611.md, run 9), while a mark costs one event record.

Marks: the caller's step phases (`mark(label)`), each decoder layer's forward start, its attention and experts
(forward, and "rec" for gradient checkpointing's recompute), and in the backward the moments the gradients of the
layer's output, the experts' output, the MoE block's input and the attention's output are ready. Hooks only: the
model's code is unchanged. On a CPU the "events" read the host clock (execution is synchronous there), so the table
shows lag 0: a smoke test of the wiring.
"""
from __future__ import annotations

import statistics
import time

import torch


def in_backward() -> bool:
    """Whether autograd is running a backward pass on this thread: forward hooks firing then are non-reentrant
    gradient checkpointing's recompute (torch.utils.checkpoint recomputes inside the backward, and asks autograd the
    same private question, torch._C._current_graph_task_id, to tell its own recompute apart)."""
    return torch._C._current_graph_task_id() != -1


class _HostEvent:
    """A CUDA event's interface on the host clock, for CPU runs."""

    def __init__(self):
        self.time = None

    def record(self):
        self.time = time.perf_counter()

    def elapsed_time(self, end: "_HostEvent") -> float:
        return (end.time - self.time) * 1e3


class LagMarks:
    """Hooks on a Qwen3-MoE model's decoder layers that record marks while `recording` is on.

    Use: marks = LagMarks(model); marks.start(); run steps, each calling marks.mark("step start") first and
    marks.mark(<phase>) after its phases; torch.cuda.synchronize(); print(marks.table()); marks.remove()."""

    def __init__(self, model: torch.nn.Module):
        self.cuda = next(model.parameters()).is_cuda
        self.recording = False
        self.marks: list[tuple[str, float, object]] = []
        self.handles = []
        for i, layer in enumerate(model.model.layers):
            self._on_forward(layer, f"L{i}", grad_label=f"bwd L{i} start", start_label=f"fwd L{i}")
            self._on_forward(layer.self_attn, f"L{i} attn", grad_label=f"bwd L{i} attn-out grad")
            experts = getattr(layer.mlp, "experts", None)
            if experts is not None:  # a sparse MoE layer
                self._on_forward(experts, f"L{i} experts", grad_label=f"bwd L{i} experts-out grad")
                self.handles.append(layer.mlp.register_forward_pre_hook(
                    lambda module, args, i=i: self._on_grad(args[0], f"bwd L{i} moe-in grad")))

    def _on_forward(self, module, name, grad_label, start_label=None):
        def pre_hook(module, args):
            if start_label is None:  # sub-modules: marked in the forward and in the recompute
                self.mark(f"{'rec' if in_backward() else 'fwd'} {name}")
            elif not in_backward():
                self.mark(start_label)

        def hook(module, args, output):
            self._on_grad(output, grad_label)

        self.handles += [module.register_forward_pre_hook(pre_hook), module.register_forward_hook(hook)]

    def _on_grad(self, tensor, label) -> None:
        """Mark when the gradient of `tensor` is ready (forward only: the recompute's tensors get none). Returns None:
        a forward hook's return value would replace the module's output."""
        tensor = tensor[0] if isinstance(tensor, tuple) else tensor
        if self.recording and not in_backward() and torch.is_grad_enabled() and tensor.requires_grad:
            tensor.register_hook(lambda grad: self.mark(label))

    def start(self) -> None:
        self.marks.clear()
        self.recording = True

    def mark(self, label: str) -> None:
        if self.recording:
            event = torch.cuda.Event(enable_timing=True) if self.cuda else _HostEvent()
            event.record()
            self.marks.append((label, time.perf_counter(), event))

    def table(self) -> str:
        """Median over the recorded steps after the first (which starts from an empty GPU) of each mark's times from
        its step's start on the host; call after synchronizing. Steps are cut at each "step start" mark."""
        self.recording = False
        _, host0, event0 = self.marks[0]
        rows = [(label, (host - host0) * 1e3, event0.elapsed_time(event)) for label, host, event in self.marks]
        starts = [i for i, row in enumerate(rows) if row[0] == "step start"]
        if len(starts) < 2:
            raise ValueError("the lag table needs at least two steps, each starting with mark('step start')")
        steps = [rows[a:b] for a, b in zip(starts, starts[1:] + [len(rows)])][1:]
        by_label = [{label: (host - step[0][1], gpu - step[0][1]) for label, host, gpu in step} for step in steps]
        lines = [f"Median of {len(steps)} steps (each after the previous one, as in a run); times in ms from the "
                 "step's start on the host; lag = GPU reached the mark - host enqueued it (about 0: the GPU waited "
                 "for the host).", "", "| mark | host ms | GPU ms | lag ms | host dt | GPU dt |", "|---|---|---|---|---|---|"]
        previous = (0.0, 0.0)
        for label in by_label[0]:
            times = [step[label] for step in by_label if label in step]
            host, gpu = statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)
            lines.append(f"| {label} | {host:.2f} | {gpu:.2f} | {gpu - host:.2f} | {host - previous[0]:.2f} | "
                         f"{gpu - previous[1]:.2f} |")
            previous = (host, gpu)
        return "\n".join(lines)

    def remove(self) -> None:
        self.recording = False
        for handle in self.handles:
            handle.remove()

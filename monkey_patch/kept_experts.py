"""`--recompute_experts`: under gradient checkpointing, keep the experts' activations instead of recomputing them.

Gradient checkpointing saves each decoder layer's input and recomputes the whole layer in the backward. For a MoE
layer the experts are most of that recompute: on the H200, at 8K tokens of Qwen3-30B-A3B, their forward kernels take
1.7 ms per layer (routing sort, gate_up GEMM + SwiGLU, down GEMM, K-sum; bench/results/moe_block_h200_202611.md), and
keeping them cut the experts' kernel time of an 8-layer step from 49.6 to 38.4 ms (train_step_h200_202611.md, run 5).
Keeping what the experts' backward needs costs 2I + I values of h and aw per routed row (K = 8 rows per token):
0.28 GiB per layer at 8K tokens in bf16. When the step's peak is set by the gradients at the end of the backward, as
on one GPU, those activations are freed, layer by layer, before that peak (measured: 41.99 GiB against 42.01).

`auto` (the default) keeps them where that cannot raise the step's peak: in a run that does not shard the model,
every gradient (as large as the parameters) is alive at the end of the backward, where the peak is (run 5: at the
last layer's experts weight gradient), while the kept activations live from their layer's forward to its backward
and are freed layer by layer before it. `auto` keeps them when they total at most half the gradients' bytes, for the
longest micro-batch the run can make (max_seq_length x per-device batch). At 8 layers of Qwen3-30B-A3B and 8K tokens:
2.2 GiB kept against 10.4 GiB of gradients, peak 41.97 GiB kept against 42.02 recomputed, and the step 1.10x faster
(train_step_h200_202611.md, run 7; in run 11, 41.97 both and 1.11x, the recomputed experts' backward no longer
allocating zero gradients). Under FSDP2 or ZeRO-3 the gradients are sharded, so the rule does not hold:
`auto` recomputes there. `false` works under both (tests/test_distributed.py, 2 CPU processes: the experts run once
per layer and step, with the losses of one process); on 2 H200s at 8 layers it made the FSDP2 step 6% faster at the
same peak and the ZeRO-3 step 23% slower (sft_run_h200_202611.md).

How, with torch's non-reentrant checkpoint left in charge of the rest of the layer:
  * the experts' saved tensors go through our own saved-tensors hooks, innermost, so the checkpoint never sees them;
    each is handed out once (then the experts' backward holds the only reference and frees h early, ops.py);
  * the checkpoint gets a `context_fn` whose recompute context marks the recompute; there the experts return zeros
    without running: nothing after them in the layer saves a tensor, and their backward uses the kept activations.
FSDP2's own activation checkpointing (config/accelerate/fsdp2.yaml; train.py then turns transformers' off) wraps each
decoder layer in torch's non-reentrant checkpoint without our `context_fn`. The experts are still not recomputed
there: the checkpoint stops recomputing once it has rebuilt every tensor it saved (torch's default early stop), and
the experts' tensors are not among them. tests/test_distributed.py counts the experts' runs under both backends.
"""
from __future__ import annotations

import contextlib
import functools
import threading

import torch

from monkey_patch import is_moe_layer
from monkey_patch.errors import PatchError

KEEP_ATTRIBUTE = "keep_activations_under_checkpoint"  # set on each experts module by `keep_experts_activations`
_state = threading.local()  # the recompute runs on autograd's thread


def in_recompute() -> bool:
    return getattr(_state, "recomputing", 0) > 0


@contextlib.contextmanager
def _recomputing():
    _state.recomputing = getattr(_state, "recomputing", 0) + 1
    try:
        yield
    finally:
        _state.recomputing -= 1


def checkpoint_contexts():
    """`context_fn` for torch.utils.checkpoint: nothing around the forward, the recompute marked."""
    return contextlib.nullcontext(), _recomputing()


class _HandedOutOnce:
    """A kept activation: the backward's unpack takes it, so the autograd graph no longer holds it."""
    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    def take(self) -> torch.Tensor:
        if self.tensor is None:
            raise RuntimeError("an experts activation kept by --recompute_experts false was already used by a backward "
                               "pass (retain_graph / a second backward): use --recompute_experts true for that")
        tensor, self.tensor = self.tensor, None
        return tensor


def kept_activations():
    """Saved-tensors hooks for the experts' forward (innermost: a surrounding checkpoint does not see the tensors)."""
    return torch.autograd.graph.saved_tensors_hooks(_HandedOutOnce, _HandedOutOnce.take)


def experts_forward_keeping_activations(experts_forward):
    """Wrap an experts function of transformers' experts interface: on modules marked by `keep_experts_activations`,
    keep its activations and skip it in a checkpoint's recompute; on other modules, unchanged."""
    @functools.wraps(experts_forward)
    def forward(self, hidden_states, top_k_index, top_k_weights):
        if not getattr(self, KEEP_ATTRIBUTE, False) or not torch.is_grad_enabled():
            return experts_forward(self, hidden_states, top_k_index, top_k_weights)
        if in_recompute():  # the backward reads the activations kept below; nothing downstream in the layer saves
            # A broadcast zero, not a [T, H] buffer: no fill kernel (60 us per layer at 8K tokens on the H200).
            return hidden_states.new_zeros(()).expand(hidden_states.shape)
        with kept_activations():
            return experts_forward(self, hidden_states, top_k_index, top_k_weights)
    return forward


def kept_bytes(config, tokens: int, dtype: torch.dtype) -> int:
    """What keeping costs: h [K rows per token, 2I] and aw [K, I] per MoE layer (ops.py), in the activations' dtype."""
    moe_layers = sum(is_moe_layer(config, layer) for layer in range(config.num_hidden_layers))
    return moe_layers * tokens * config.num_experts_per_tok * 3 * config.moe_intermediate_size * dtype.itemsize


def choose_recompute_experts(requested: str, model: torch.nn.Module, moe_kernel: str, compile_layers: bool,
                             sharding: str | None, tokens_per_micro_batch: int | None) -> tuple[bool, str]:
    """(recompute the experts?, why) for --recompute_experts auto|true|false; `false` where unsupported raises."""
    if requested not in ("auto", "true", "false"):
        raise PatchError(f"--recompute_experts {requested!r}: choose auto, true or false")
    if requested != "auto":
        if requested == "false":
            check_kept_experts(moe_kernel, compile_layers)
        return requested == "true", f"--recompute_experts {requested}"
    if not keeping_supported(moe_kernel, compile_layers):
        return True, "auto: keeping needs our experts kernel in uncompiled layers"
    if not tokens_per_micro_batch:
        raise PatchError("recompute_experts='auto' needs tokens_per_micro_batch (the longest micro-batch's tokens)")
    if sharding:
        return True, (f"auto: under {sharding} the gradients are sharded, so keeping could raise the peak; "
                      "--recompute_experts false keeps the activations anyway")
    parameters = [p for p in model.parameters() if p.requires_grad]
    gradients = sum(p.numel() * p.element_size() for p in parameters)
    kept = kept_bytes(model.config, tokens_per_micro_batch, parameters[0].dtype)
    keep = 2 * kept <= gradients
    return not keep, (f"auto: kept experts activations {kept / 2**30:.2f} GiB for {tokens_per_micro_batch} tokens, "
                      f"gradients {gradients / 2**30:.2f} GiB: {'keep' if keep else 'recompute'} (keep when at most "
                      "half the gradients)")


def keeping_supported(moe_kernel: str, compile_layers: bool) -> bool:
    """Keeping is implemented for our experts kernel in uncompiled layers (its wrapper and saved-tensors hooks)."""
    return moe_kernel == "scattermoe" and not compile_layers


def check_kept_experts(moe_kernel: str, compile_layers: bool) -> None:
    """Raise for the setups `--recompute_experts false` does not support (train.py asks before loading the model)."""
    if not keeping_supported(moe_kernel, compile_layers):
        raise PatchError("--recompute_experts false is implemented for our experts kernel in uncompiled layers: use "
                         "--moe_kernel auto and --compile_layers false, or --recompute_experts true")


def keep_experts_activations(model: torch.nn.Module) -> None:
    """Mark every experts module of `model` and make `model.gradient_checkpointing_enable` pass `checkpoint_contexts`
    to torch's checkpoint (the Trainer calls it at the start of training, the bench by hand)."""
    experts = [m for m in model.modules() if hasattr(m, "gate_up_proj") and hasattr(m, "down_proj")]
    for module in experts:
        setattr(module, KEEP_ATTRIBUTE, True)
    enable = model.gradient_checkpointing_enable
    if getattr(enable, "marks_recompute", False):
        return

    @functools.wraps(enable)
    def gradient_checkpointing_enable(gradient_checkpointing_kwargs=None, **kwargs):
        checkpoint_kwargs = dict(gradient_checkpointing_kwargs or {"use_reentrant": False})
        if checkpoint_kwargs.get("use_reentrant", True) or "context_fn" in checkpoint_kwargs:
            raise PatchError("--recompute_experts false needs torch's non-reentrant checkpoint without a context_fn of "
                             "its own: set gradient_checkpointing_kwargs {\"use_reentrant\": false}, or use "
                             "--recompute_experts true")
        return enable(gradient_checkpointing_kwargs={**checkpoint_kwargs, "context_fn": checkpoint_contexts}, **kwargs)

    gradient_checkpointing_enable.marks_recompute = True
    model.gradient_checkpointing_enable = gradient_checkpointing_enable

"""Liger kernels on one Qwen3-MoE model instance, through Liger's own entry point apply_liger_kernel_to_qwen3_moe.

Flags and why (whole-step numbers: bench/results/baselines_h200_202611.md, 6 layers, seq 8192, one H200):
  rope, rms_norm             Triton RoPE and RMSNorm (incl. the per-head q_norm/k_norm); numerically the stock ops.
  fused_linear_cross_entropy lm_head + CE in chunks, never materialising [tokens, 151936] logits: peak 41.0 -> 33.0 GiB
                             and 0.213 -> 0.206 s/step together with rope/rms_norm. In training it returns
                             logits=None: nothing may read outputs.logits then. In eval mode it materialises them
                             (and transformers' CE upcasts them): [tokens, 151936] again during Trainer.evaluate.
  experts                    Liger's fused LigerExperts forward on every MoE layer (0.206 -> 0.184 s/step), a peer of
                             our own experts kernel; off by default (Liger calls it swiglu and defaults it to True).
  cross_entropy              never: exclusive with fused_linear_cross_entropy, and it swaps torch's cross_entropy
                             inside transformers.loss for the whole process.
  ce_chunk_tokens            ours, not Liger's: tokens per chunk of the fused linear cross-entropy. Liger sizes a
                             chunk so its logits match the input's size: 128 tokens at Qwen3-30B-A3B shapes, 64
                             chunks for 8,192 tokens, each adding its [151936, 2048] lm_head gradient into the
                             full bf16 buffer: that accumulation took 30 ms of a 227-ms step on the H200, memory-bound
                             at K=128. 2,048-token chunks make it 4 GEMMs of K=2048 (6.4 ms) for 0.6 GB of transient
                             logits, and 4 bf16 roundings of the gradient instead of 64: the step went from 0.215 to
                             0.170 s, same loss (bench/results/train_step_h200_202611.md, run 4).

The MoE load-balancing loss survives: liger 0.8.5's qwen3_moe.lce_forward adds
router_aux_loss_coef * load_balancing_loss_func(router_logits, num_experts, top_k, attention_mask) whenever labels
are given, as transformers 5.17's Qwen3MoeForCausalLM.forward does (both skip it when only shift_labels is given).
tests/test_liger_patch.py pins this against the stock model and a hand computation, so a Liger upgrade that drops it
fails there.

Scope: Liger also swaps the module-level classes Qwen3MoeRMSNorm / Qwen3MoeExperts, so every model built later in
the process would get them; we put those back after it has patched this instance, so only `model` changes. Two
process-wide changes are left: rope (transformers calls the module function apply_rotary_pos_emb, which has no
per-instance hook: every Qwen3-MoE model in the process then uses Liger's RoPE, a CUDA-only Triton kernel), and the CE
chunk size (lce_forward looks its loss function up in its module; the only per-call route, a forward keyword, would
also flow into every decoder layer's kwargs), so one process runs one chunk size and asking for two raises.
"""
from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

_FLAGS_ATTR = "_liger_flags"


def liger_chunk_mem_const(tokens: int, vocab: int, hidden: int, chunk_tokens: int) -> int:
    """The smallest `chunk_mem_const` for which Liger's fused linear CE (liger 0.8.5,
    ops/fused_linear_cross_entropy.py) takes at least min(chunk_tokens, tokens) tokens per chunk. Liger's rule:
    inc = ceil(vocab / (const * hidden)); chunk = min(next_power_of_2(ceil(tokens / inc)), tokens)."""
    def liger_chunk(const: int) -> int:
        inc = -(-vocab // (const * hidden))
        return min(1 << (-(-tokens // inc) - 1).bit_length(), tokens)

    const = 1
    while liger_chunk(const) < min(chunk_tokens, tokens) and const * hidden < vocab:
        const += 1
    return const


class _ChunkedLoss:
    """Liger's LigerForCausalLMLoss with chunks of `chunk_tokens` tokens; Liger's qwen3_moe.lce_forward calls it."""

    def __init__(self, loss, chunk_tokens: int):
        self.loss, self.chunk_tokens = loss, chunk_tokens

    def __call__(self, hidden_states, lm_head_weight, labels, hidden_size, **kwargs):
        tokens, vocab = hidden_states.numel() // hidden_size, lm_head_weight.shape[0]
        kwargs.setdefault("chunk_mem_const", liger_chunk_mem_const(tokens, vocab, hidden_size, self.chunk_tokens))
        return self.loss(hidden_states, lm_head_weight, labels, hidden_size=hidden_size, **kwargs)


def _install_chunked_loss(chunk_tokens: int | None) -> None:
    """Process-wide: lce_forward looks the loss up in its module, so every Liger-patched Qwen3-MoE model of the
    process shares one chunk size; asking for another one raises rather than changing the models patched before."""
    from liger_kernel.transformers.model import qwen3_moe as liger_qwen3_moe

    current = getattr(liger_qwen3_moe.LigerForCausalLMLoss, "chunk_tokens", None)
    if current == chunk_tokens:
        return
    if current is not None:
        raise ValueError(f"the fused linear CE already runs {current}-token chunks in this process (a process-wide "
                         f"setting); cannot switch to {chunk_tokens}: use one ce_chunk_tokens per process")
    if chunk_tokens is not None:
        liger_qwen3_moe.LigerForCausalLMLoss = _ChunkedLoss(liger_qwen3_moe.LigerForCausalLMLoss, chunk_tokens)


def _check_supported(model, experts: bool) -> None:
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeForCausalLM, Qwen3MoeSparseMoeBlock

    if not isinstance(model, Qwen3MoeForCausalLM):
        raise TypeError(f"apply_liger supports Qwen3MoeForCausalLM, got {type(model).__name__}: apply Liger before "
                        "wrapping the model (PEFT, FSDP, DDP), or run without --liger")
    if not experts:
        return
    dense = [i for i, layer in enumerate(model.model.layers) if not isinstance(layer.mlp, Qwen3MoeSparseMoeBlock)]
    if dense:  # Liger's instance patch reads layer.mlp.experts on every layer and would fail half-way
        raise ValueError(f"experts=True needs every decoder layer to be MoE; layers {dense} are dense "
                         "(mlp_only_layers / decoder_sparse_step): use experts=False")
    if model.config.hidden_act not in ("silu", "swish"):
        raise ValueError(f"LigerExperts implements SwiGLU, the model uses {model.config.hidden_act}: use experts=False")
    impl = getattr(model.config, "_experts_implementation", None)
    if impl not in (None, "grouped_mm", "eager"):  # Liger binds its forward over whatever backend was chosen
        raise ValueError(f"experts=True would silently replace experts_implementation={impl!r}: choose one of them "
                         "(experts=False, or load with experts_implementation='grouped_mm')")


def apply_liger(model, rope: bool = True, rms_norm: bool = True, fused_linear_cross_entropy: bool = True,
                experts: bool = False, ce_chunk_tokens: int | None = None) -> None:
    """Patch `model` (a Qwen3MoeForCausalLM, before any wrapping) in place. Calling it again with the same flags does
    nothing; with other flags it raises, since the patches cannot be undone. Needs CUDA to run (Triton kernels).
    `ce_chunk_tokens`: tokens per fused-linear-CE chunk (module docstring); None keeps Liger's own sizing."""
    if ce_chunk_tokens is not None and (not fused_linear_cross_entropy or ce_chunk_tokens < 1):
        raise ValueError(f"ce_chunk_tokens={ce_chunk_tokens} needs fused_linear_cross_entropy=True and a value >= 1")
    flags = dict(rope=rope, rms_norm=rms_norm, fused_linear_cross_entropy=fused_linear_cross_entropy, experts=experts,
                 ce_chunk_tokens=ce_chunk_tokens)
    applied = getattr(model, _FLAGS_ATTR, None)
    if applied == flags:
        return
    if applied is not None:
        raise ValueError(f"Liger is already applied to this model with {applied}; its patches cannot be undone: "
                         f"reload the model to apply {flags}")
    _check_supported(model, experts)

    from liger_kernel.transformers.monkey_patch import apply_liger_kernel_to_qwen3_moe
    from transformers.models.qwen3_moe import modeling_qwen3_moe as mod

    class_level = {name: getattr(mod, name) for name in ("Qwen3MoeRMSNorm", "Qwen3MoeExperts")}
    forward_before = mod.Qwen3MoeForCausalLM.__dict__["forward"]
    _install_chunked_loss(ce_chunk_tokens)
    apply_liger_kernel_to_qwen3_moe(rope=rope, cross_entropy=False, fused_linear_cross_entropy=fused_linear_cross_entropy,
                                    rms_norm=rms_norm, swiglu=experts, model=model)
    for name, value in class_level.items():  # the instance is patched; models built later stay stock
        setattr(mod, name, value)
    if mod.Qwen3MoeForCausalLM.__dict__["forward"] is not forward_before:  # with model=, 0.8.5 patches the instance
        raise RuntimeError("this liger-kernel replaced Qwen3MoeForCausalLM.forward class-wide; pin liger-kernel==0.8.5")
    setattr(model, _FLAGS_ATTR, flags)
    logger.info("Liger applied to %s: %s", type(model).__name__, flags)


def liger_flags(model) -> dict | None:
    """The flags apply_liger patched `model` with, or None."""
    return getattr(model, _FLAGS_ATTR, None)

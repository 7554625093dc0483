"""Speed patches for Qwen3-MoE, applied to a loaded model through one entry point, `apply_patches`.

Order, and why:
  1. experts implementation: a named implementation registered with transformers (parameters keep their stock names
     and shapes, so checkpoints, ZeRO-3 and FSDP see the same tensors);
  2. Liger rope / rms_norm / fused linear cross-entropy: module and forward swaps on the instance;
  3. attention implementation: chosen for the batches the run makes (packed or padded); ours also skip transformers'
     packed-sequence detection, a host sync they do not need;
  4. FP8: it converts the nn.Linear modules that remain after the swaps above, and switches our experts kernel to
     its FP8 variant (`scattermoe_fp8`) unless `fp8_experts=False`;
  5. torch.compile of each decoder layer last, so it traces the final modules (in place: FSDP still finds the
     decoder-layer class to wrap);
  6. recompute_experts: whether the experts' activations are kept under gradient checkpointing
     (monkey_patch/kept_experts.py; `auto` keeps them where the step's peak cannot rise).
Every step is idempotent and logged; an unsupported combination raises PatchError, whose message says how to fix it.
"""
from __future__ import annotations

import logging

import torch
from transformers import PreTrainedModel

from monkey_patch.errors import PatchError

logger = logging.getLogger(__name__)

MOE_KERNELS = ("scattermoe", "grouped_mm", "liger", "eager")


def is_moe_layer(config, layer: int) -> bool:
    """Whether decoder layer `layer` of a Qwen3-MoE config has the sparse MoE block: transformers' own rule
    (Qwen3MoeDecoderLayer), for code that sizes things from the config before or without a model."""
    return (layer not in (config.mlp_only_layers or []) and config.num_experts > 0
            and (layer + 1) % config.decoder_sparse_step == 0)


def resolve_moe_kernel(requested: str) -> str:
    """`auto` is our kernel; on a CPU it runs its plain-torch path."""
    if requested == "auto":
        return "scattermoe"
    if requested not in MOE_KERNELS:
        raise PatchError(f"--moe_kernel {requested!r}: choose one of auto, {', '.join(MOE_KERNELS)}")
    return requested


def resolve_liger(requested: str, device: torch.device) -> bool:
    """Liger's kernels are Triton GPU kernels: `auto` means on where the model trains on CUDA."""
    if requested not in ("auto", "true", "false"):
        raise PatchError(f"--liger {requested!r}: choose auto, true or false")
    if requested == "true" and device.type != "cuda":
        raise PatchError(f"--liger true needs a CUDA GPU (Liger's kernels are Triton GPU kernels), this run is on "
                         f"{device.type}: use --liger auto or false")
    return device.type == "cuda" if requested == "auto" else requested == "true"


def resolve_compile_layers(requested: str, fp8: bool, sharding: str | None = None) -> bool:
    """`auto` compiles with FP8 only (torchao builds its fused FP8 casts with torch.compile, torchao issue #685), and
    never under FSDP2 or ZeRO-3: compiled decoder layers failed under both on the H200 (2026-11-28, 8 layers, 1 and 2
    GPUs, with and without FP8): an illegal memory access in the compiled backward under FSDP2, an AssertionError in
    inductor under ZeRO-3; the same layers compile and train on one GPU without a sharding backend."""
    if requested not in ("auto", "true", "false"):
        raise PatchError(f"--compile_layers {requested!r}: choose auto, true or false")
    if requested == "true" and sharding:
        raise PatchError(f"--compile_layers true fails under {sharding} (compiled decoder layers crashed in their "
                         "backward on the H200 under both FSDP2 and ZeRO-3): use --compile_layers auto or false")
    return fp8 and not sharding if requested == "auto" else requested == "true"


def apply_patches(model: PreTrainedModel, moe_kernel: str = "auto", liger: str = "auto",
                  attn_implementation: str = "auto", fp8: bool = False, fp8_recipe: str = "tensorwise",
                  fp8_experts: bool = True, compile_layers: str = "auto", device: torch.device | str | None = None,
                  sharding: str | None = None, ce_chunk_tokens: int = 2048, recompute_experts: bool | str = True,
                  tokens_per_micro_batch: int | None = None) -> dict:
    """Apply the patches to `model` in place; returns what was chosen, for the log.

    `device` is where the model will train (the Trainer moves it there later); default: CUDA if available.
    `sharding` is the backend that will shard the model ("fsdp", "deepspeed") or None.
    `ce_chunk_tokens` sizes the chunks of Liger's fused linear cross-entropy (monkey_patch/liger.py); 0 keeps Liger's.
    `recompute_experts` False (or "false") keeps the experts' activations instead of recomputing them under gradient
    checkpointing (monkey_patch/kept_experts.py): our experts kernel only, uncompiled layers; "auto" keeps them when
    the model is not sharded and they total at most half the gradients for `tokens_per_micro_batch` tokens.
    """
    from monkey_patch.liger import apply_liger
    from monkey_patch.packed_attention import FLEX_PACKED, VARLEN_PACKED, choose_attention, skip_packed_detection

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    applied = {"moe_kernel": resolve_moe_kernel(moe_kernel), "liger": resolve_liger(liger, device)}
    if applied["moe_kernel"] == "liger" and device.type != "cuda":
        raise PatchError("--moe_kernel liger needs a CUDA GPU (Liger's fused experts are Triton GPU kernels): "
                         "use --moe_kernel auto, scattermoe, grouped_mm or eager here")
    if applied["moe_kernel"] == "scattermoe":
        import monkey_patch.scattermoe  # noqa: F401  registers the "scattermoe" experts implementation
    if applied["moe_kernel"] == "liger":
        model.set_experts_implementation("eager")  # LigerExperts replaces the experts modules outright
    else:
        model.set_experts_implementation(applied["moe_kernel"])
    if ce_chunk_tokens < 0:
        raise PatchError(f"--ce_chunk_tokens {ce_chunk_tokens}: a token count per fused cross-entropy chunk (default "
                         "2048), or 0 for Liger's own sizing")
    if applied["liger"] or applied["moe_kernel"] == "liger":
        chunk = ce_chunk_tokens if applied["liger"] and ce_chunk_tokens > 0 else None
        apply_liger(model, rope=applied["liger"], rms_norm=applied["liger"],
                    fused_linear_cross_entropy=applied["liger"], experts=applied["moe_kernel"] == "liger",
                    ce_chunk_tokens=chunk)
    applied["attn_implementation"] = choose_attention(attn_implementation, device)
    model.set_attn_implementation(applied["attn_implementation"])
    if applied["attn_implementation"] in (VARLEN_PACKED, FLEX_PACKED):
        skip_packed_detection()
    if fp8:
        from monkey_patch.fp8 import apply_fp8
        applied["fp8"] = apply_fp8(model, recipe=fp8_recipe)  # raises below SM89, so the experts need no own check
        applied["fp8_experts"] = fp8_experts and applied["moe_kernel"] == "scattermoe"
        if applied["fp8_experts"]:
            model.set_experts_implementation("scattermoe_fp8")
    applied["compile_layers"] = resolve_compile_layers(compile_layers, fp8, sharding)
    if fp8 and sharding:
        logger.warning("--fp8 under %s runs uncompiled, so torchao's casts are not fused: measured slower than bf16 "
                       "(2 H200s, 8 layers, FSDP2: 18,834 vs 26,426 tokens/s/GPU, bench/results/)", sharding)
    from monkey_patch.kept_experts import choose_recompute_experts, keep_experts_activations
    applied["recompute_experts"], why = choose_recompute_experts(str(recompute_experts).lower(), model,
                                                                 applied["moe_kernel"], applied["compile_layers"],
                                                                 sharding, tokens_per_micro_batch)
    logger.info("recompute_experts=%s (%s)", applied["recompute_experts"], why)
    if not applied["recompute_experts"]:
        keep_experts_activations(model)
    if applied["compile_layers"]:
        for layer in model.model.layers:
            layer.compile()  # idempotent: compiling again replaces the compiled call of the same module
    logger.info("patches applied: %s", applied)
    return applied

"""Launchers, autograd and torch.library custom ops of the fused experts (kernels in kernels.py).

Shape legend: T tokens, K top_k, E experts, H hidden, I moe intermediate, S = T*K routed rows.

Forward (2 GEMM launches + sort + one [S, H] -> [T, H] sum):
  h [S, 2I], aw [S, I] = X[tok] @ gate_up[e]^T, w * silu(h_gate) * h_up (gather_matmul; expert-sorted rows)
  buf [S, H]           = aw @ down[e]^T, written to each row's (t, k) slot   (scatter_matmul)
  Y [T, H]             = buf.view(T, K, H).sum(1)   (deterministic; fp32 accumulation inside torch.sum)
Backward (4 GEMM launches, in this order: see the note above experts_bwd_dh):
  dH [S, 2I], dw partials = SwiGLU-bwd(w * dY[tok] @ down[e]), <dY[tok] @ down[e], a>  (gather_matmul epilogue)
  dX           = (dH @ gate_up[e] scattered to slots).view(T, K, H).sum(1)   (scatter_matmul)
  d gate_up[e] = sum_r dH^T X[tok]           (expert_wgrad)
  d down[e]    = sum_r dY[tok]^T aw          (expert_wgrad)
Saved for backward: h [S, 2I], aw [S, I] and the routing metadata (counts [E] int32, slot [S] int64), all
computed from the inputs by a stable sort, so a gradient-checkpointing recompute reproduces them bit for bit.

fp8=True: the four row GEMMs (gate_up, down, dY@down, dX) take e4m3 operands with fp32 scales over their
contraction dim (fp8_quant.py): X, aw, dY, dH one scale per row; each weight one per (expert, output channel),
quantised afresh in every forward/backward from the bf16 master (the backward's copies transposed, K-major).
h, aw, dH, the outputs and all gradients keep the weights' dtype; the two weight gradients stay in that dtype
too (their contraction runs over routed rows, where per-row scales do not factor out: torchao's
rowwise_with_gw_hp makes the same choice). Nothing extra is saved for the backward.
"""
import json
import os

import torch
import triton

from . import kernels as kn
from .fp8_quant import quantize_cols_t, quantize_rows

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Fixed configs when autotuning is off (SCATTERMOE_AUTOTUNE=0: GPU tests, where each new shape would retune) or
# under the CPU interpreter (16 = tl.dot's smallest tile; small tiles make tiny test shapes cross tile edges).
_FIXED_BF16 = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_D": 64, "num_warps": 8, "num_stages": 3}
_FIXED_BF16_WGRAD = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_R": 64, "num_warps": 8, "num_stages": 3}
_FIXED_INTERPRET = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_D": 16}
_FIXED_INTERPRET_WGRAD = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_R": 16}
# FP8 dots take K in steps of 32 on the GPU; the interpreter uses the same BLOCK_D so its tests cross the same masks.
# The fixed GPU config is the bf16 one (kernels.py: BLOCK_D 64 spills less than 128 when compiled for sm_90).
_FIXED_FP8 = _FIXED_BF16
_FIXED_INTERPRET_FP8 = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_D": 32}
# Overrides for the gather kernel's fixed config (BLOCK_N, and the backward's constexpr variant switches such as
# SWIGLU_LEAN): the CPU tests set this to run every variant the autotune lists can pick (test_scattermoe_cpu.py);
# on the GPU, SCATTERMOE_GATHER_VARIANT='{"SWIGLU_LEAN": true, "BLOCK_N": 64}' with SCATTERMOE_AUTOTUNE=0 does.
_FIXED_GATHER_VARIANT: dict = json.loads(os.environ.get("SCATTERMOE_GATHER_VARIANT", "{}"))


# Which FP8 GEMMs promote partial sums to fp32 every K-tile (kernels.py, FP8_PROMOTE): torchao's default float8
# recipes use fast accumulation for the forward output and precise accumulation for input gradients; same here.
# SCATTERMOE_FP8_PROMOTE=all|none|bwd overrides (read per call: for tests and the GPU session's A/B timing).
def _fp8_promote(backward: bool) -> bool:
    mode = os.environ.get("SCATTERMOE_FP8_PROMOTE", "bwd")
    return mode == "all" or (mode == "bwd" and backward)


def _autotune() -> bool:
    return not _INTERPRET and os.environ.get("SCATTERMOE_AUTOTUNE", "1") != "0"


def _fixed(dtype: torch.dtype, wgrad: bool) -> dict:
    if dtype.itemsize == 1:
        return _FIXED_INTERPRET_FP8 if _INTERPRET else _FIXED_FP8
    if _INTERPRET:
        return _FIXED_INTERPRET_WGRAD if wgrad else _FIXED_INTERPRET
    if dtype == torch.float32:
        return kn.FP32_WGRAD_CONFIG if wgrad else kn.FP32_CONFIG
    return _FIXED_BF16_WGRAD if wgrad else _FIXED_BF16


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 dots follow torch's matmul TF32 switch, so an fp32 test with TF32 off compares exact-fp32 products.
    # FP8 dots get Triton's default ("tf32"; the setting only affects fp32 operands), as in Triton's fp8 tutorial.
    if dtype.itemsize == 1:
        return "tf32"
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def routing_metadata(top_k_index_TK: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """counts_E int32 (rows per expert) and slot_S int64 (flat (t, k) index of each expert-sorted row).

    Stable sort: ties keep (t, k) order, so the metadata is a pure function of the routing (recompute-safe).
    Counts come from searchsorted on the sorted ids rather than bincount's atomics.
    """
    expert_S = top_k_index_TK.reshape(-1)
    sorted_expert_S, slot_S = torch.sort(expert_S, stable=True)
    experts_E = torch.arange(num_experts, device=expert_S.device, dtype=sorted_expert_S.dtype)
    ends_E = torch.searchsorted(sorted_expert_S, experts_E, right=True)
    counts_E = torch.diff(ends_E, prepend=ends_E.new_zeros(1)).to(torch.int32)
    return counts_E, slot_S


def _gather_matmul(a_TD, b_E, b_strides, tok_S, counts_E, w_S, h_S2I=None, scales=None, out_dtype=None):
    """Forward (h_S2I None): a_TD = X, b_E = gate_up -> (h [S, 2I], aw [S, I]).
    Backward: a_TD = dY, b_E = down, h_S2I saved -> (dH [S, 2I], dw partials [ceil(I / BLOCK_N), S] fp32, BLOCK_N
    the chosen config's).
    b_strides = (expert, d, n) strides of B viewed as [E, D, N] (N = I).
    FP8: a_TD, b_E e4m3, scales = (a_scale [T] fp32, b_scale [E, 2I] forward / [E, I] backward fp32), and
    out_dtype (h, aw, dH) the master dtype; otherwise the outputs take a_TD's dtype."""
    S, D, E = tok_S.numel(), a_TD.shape[1], counts_E.numel()
    N = b_E.shape[1] // 2 if h_S2I is None else h_S2I.shape[1] // 2
    backward = h_S2I is not None
    fp8 = scales is not None
    tuned = _autotune()
    variant = {k: v for k, v in _FIXED_GATHER_VARIANT.items() if backward or k.startswith("BLOCK")}
    meta = {} if tuned else {**_fixed(a_TD.dtype, wgrad=False), **variant}
    out_dtype = out_dtype or a_TD.dtype
    c = torch.empty(S, 2 * N, device=a_TD.device, dtype=out_dtype)
    kernels = ((kn.swiglu_bwd_fp8_tuned, kn.gate_up_fp8_tuned) if fp8 else (kn.swiglu_bwd_tuned, kn.gate_up_tuned))
    kernel = kernels[0 if backward else 1] if tuned else (kn.gather_matmul_variant if backward else kn.gather_matmul)
    # dw partials: one row per N-tile of whichever config runs, so size for the smallest BLOCK_N the autotuner may
    # pick and return only the rows the chosen config wrote (the others hold garbage from tuning runs).
    block_n = min(cfg.kwargs["BLOCK_N"] for cfg in kernel.configs) if tuned else meta["BLOCK_N"]
    aux = (torch.empty(triton.cdiv(N, block_n), S, device=c.device, dtype=torch.float32) if backward
           else torch.empty(S, N, device=c.device, dtype=out_dtype))
    a_scale, b_scale = scales if fp8 else (w_S, w_S)  # unread placeholders when FP8 is off

    def grid(m):
        return ((triton.cdiv(S, m["BLOCK_M"]) + E) * triton.cdiv(N, m["BLOCK_N"]),)

    kernel[grid](a_TD, b_E, c, tok_S, counts_E, c if h_S2I is None else h_S2I, w_S, aux, a_scale, b_scale,
                 S, E, N, D, a_TD.stride(0), *b_strides, triton.next_power_of_2(S),
                 E_P2=triton.next_power_of_2(E), BACKWARD=backward, DOT_PREC=_dot_precision(a_TD.dtype), FP8=fp8,
                 FP8_PROMOTE=fp8 and _fp8_promote(backward), **meta)
    if backward:
        aux = aux[:triton.cdiv(N, (kernel.best_config.kwargs if tuned else meta)["BLOCK_N"])]
    return c, aux


def _scatter_matmul(a_SD, b_E, b_strides, slot_S, counts_E, N, scales=None, out_dtype=None, backward=False):
    """C [S, N] in slot order: C[slot[r]] = A[r] @ B[e(r)]; b_strides as in _gather_matmul, D = A's width.
    FP8: a_SD, b_E e4m3, scales = (a_scale [S] fp32 per sorted row, b_scale [E, N] fp32), C in out_dtype;
    backward marks the dX GEMM (it picks the FP8 accumulation mode, _fp8_promote)."""
    S, D, E = slot_S.numel(), a_SD.shape[1], counts_E.numel()
    fp8 = scales is not None
    tuned = _autotune()
    meta = {} if tuned else dict(_fixed(a_SD.dtype, wgrad=False))
    c = torch.empty(S, N, device=a_SD.device, dtype=out_dtype or a_SD.dtype)
    kernel = (kn.scatter_matmul_fp8_tuned if fp8 else kn.scatter_matmul_tuned) if tuned else kn.scatter_matmul
    a_scale, b_scale = scales if fp8 else (c, c)  # unread placeholders when FP8 is off

    def grid(m):
        return ((triton.cdiv(S, m["BLOCK_M"]) + E) * triton.cdiv(N, m["BLOCK_N"]),)

    kernel[grid](a_SD, b_E, c, slot_S, counts_E, a_scale, b_scale, S, E, N, D, a_SD.stride(0), *b_strides,
                 c.stride(0), triton.next_power_of_2(S), E_P2=triton.next_power_of_2(E),
                 DOT_PREC=_dot_precision(a_SD.dtype), FP8=fp8, FP8_PROMOTE=fp8 and _fp8_promote(backward), **meta)
    return c


def _expert_wgrad(a, b, out_EMN, counts_E, a_idx=None, b_idx=None):
    """out[e] = sum over expert e's sorted rows of A_row^T B_row (see kernels._expert_wgrad_kernel)."""
    E, M, N = out_EMN.shape
    S = int(a.shape[0] if a_idx is None else a_idx.numel())
    tuned = _autotune()
    meta = {} if tuned else dict(_fixed(a.dtype, wgrad=True))
    # Longest reductions first (skewed routing); a stable order keeps runs reproducible.
    order_E = torch.sort(counts_E, descending=True, stable=True)[1].to(torch.int32)
    kernel = kn.expert_wgrad_tuned if tuned else kn.expert_wgrad

    def grid(m):
        return (E * triton.cdiv(M, m["BLOCK_M"]) * triton.cdiv(N, m["BLOCK_N"]),)

    kernel[grid](a, b, out_EMN, counts_E if a_idx is None else a_idx, counts_E if b_idx is None else b_idx,
                 counts_E, order_E, E, M, N, a.stride(0), b.stride(0), out_EMN.stride(0), out_EMN.stride(1),
                 triton.next_power_of_2(max(S, 1)), E_P2=triton.next_power_of_2(E),
                 A_GATHER=a_idx is not None, B_GATHER=b_idx is not None, DOT_PREC=_dot_precision(a.dtype), **meta)
    return out_EMN


@torch.library.custom_op("scattermoe::experts_fwd", mutates_args=())
def experts_fwd(x_TH: torch.Tensor, gate_up_E2IH: torch.Tensor, down_EHI: torch.Tensor,
                top_k_index_TK: torch.Tensor, top_k_weights_TK: torch.Tensor, fp8: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Y [T, H], h [S, 2I], aw [S, I], counts [E] int32, slot [S] int64); x and both weights share one dtype,
    which h, aw and Y keep with fp8=True too (e4m3 GEMM operands only)."""
    T, H = x_TH.shape
    K = top_k_index_TK.shape[1]
    E, I2, _ = gate_up_E2IH.shape
    counts_E, slot_S = routing_metadata(top_k_index_TK, E)
    tok_S = torch.div(slot_S, K, rounding_mode="floor").to(torch.int32)
    w_S = top_k_weights_TK.reshape(-1)[slot_S].float()
    if fp8:
        # Scales over H (per token, per (expert, gate/up row)) and over I (per routed row, per (expert, h)).
        (x_q, sx_T), (w1_q, s1_E2I) = quantize_rows(x_TH), quantize_rows(gate_up_E2IH)
        h_S2I, aw_SI = _gather_matmul(x_q, w1_q, (w1_q.stride(0), 1, H), tok_S, counts_E, w_S,
                                      scales=(sx_T, s1_E2I), out_dtype=x_TH.dtype)
        del x_q, w1_q  # fp8 copies live only as long as their GEMM: -0.4 GB peak at 32K tokens (Qwen3-30B-A3B)
        (aw_q, saw_S), (w2_q, s2_EH) = quantize_rows(aw_SI), quantize_rows(down_EHI)
        buf_SH = _scatter_matmul(aw_q, w2_q, (w2_q.stride(0), 1, I2 // 2), slot_S, counts_E, H,
                                 scales=(saw_S, s2_EH), out_dtype=x_TH.dtype)
        return buf_SH.view(T, K, H).sum(1), h_S2I, aw_SI, counts_E, slot_S
    # gate_up[e] is [2I, H]: B[e][d=h, n=j] = gate_up[e, j, h].
    h_S2I, aw_SI = _gather_matmul(x_TH, gate_up_E2IH, (gate_up_E2IH.stride(0), 1, H), tok_S, counts_E, w_S)
    # down[e] is [H, I]: B[e][d=i, n=h] = down[e, h, i].
    buf_SH = _scatter_matmul(aw_SI, down_EHI, (down_EHI.stride(0), 1, I2 // 2), slot_S, counts_E, H)
    return buf_SH.view(T, K, H).sum(1), h_S2I, aw_SI, counts_E, slot_S


@experts_fwd.register_fake
def _experts_fwd_fake(x_TH, gate_up_E2IH, down_EHI, top_k_index_TK, top_k_weights_TK, fp8=False):
    S, I2 = top_k_index_TK.numel(), gate_up_E2IH.shape[1]
    return (x_TH.new_empty(x_TH.shape), x_TH.new_empty(S, I2), x_TH.new_empty(S, I2 // 2),
            x_TH.new_empty(gate_up_E2IH.shape[0], dtype=torch.int32), x_TH.new_empty(S, dtype=torch.int64))


# The backward is three ops, called in an order that keeps its peak low: at the moment the last weight gradient is
# allocated, every other layer's gradients are alive, so whatever this layer still holds adds to the step's peak.
# Under gradient checkpointing the recomputed h and the dH made from it are referenced only here, so they are freed
# between the ops: d down [E, H, I] comes last and sees only aw and dX beside it. Measured on the H200 (8 layers of
# Qwen3-30B-A3B, 8K tokens, bench/train_step.py --memory): h and dH, 0.375 GiB, were live at the step's peak, which
# fell from 42.39 to 42.01 GiB with this order (bench/results/train_step_h200_202611.md, run 5).

@torch.library.custom_op("scattermoe::experts_bwd_dh", mutates_args=())
def experts_bwd_dh(dy_TH: torch.Tensor, down_EHI: torch.Tensor, top_k_weights_TK: torch.Tensor, h_S2I: torch.Tensor,
                   counts_E: torch.Tensor, slot_S: torch.Tensor, tok_S: torch.Tensor, fp8: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(dH [S, 2I], d top_k_weights [T, K]): SwiGLU backward of w * dY[tok] @ down[e], and <dY[tok] @ down[e], a>."""
    T, K = top_k_weights_TK.shape
    H = dy_TH.shape[1]
    w_S = top_k_weights_TK.reshape(-1)[slot_S].float()
    if fp8:
        # down^T scaled over H per (expert, i), stored [E, I, H] so the contraction dim H stays contiguous.
        (dy_q, sdy_T), (w2t_q, s2t_EI) = quantize_rows(dy_TH), quantize_cols_t(down_EHI)
        dh_S2I, dw_partial = _gather_matmul(dy_q, w2t_q, (w2t_q.stride(0), 1, H), tok_S, counts_E, w_S,
                                            h_S2I=h_S2I, scales=(sdy_T, s2t_EI), out_dtype=dy_TH.dtype)
        del dy_q, w2t_q
    else:
        # down[e] is [H, I]: B[e][d=h, n=i] = down[e, h, i].
        dh_S2I, dw_partial = _gather_matmul(dy_TH, down_EHI, (down_EHI.stride(0), down_EHI.shape[2], 1), tok_S,
                                            counts_E, w_S, h_S2I=h_S2I)
    dw_S = torch.empty(slot_S.numel(), device=dy_TH.device, dtype=torch.float32)
    dw_S[slot_S] = dw_partial.sum(0)
    return dh_S2I, dw_S.view(T, K).to(top_k_weights_TK.dtype)


@experts_bwd_dh.register_fake
def _experts_bwd_dh_fake(dy_TH, down_EHI, top_k_weights_TK, h_S2I, counts_E, slot_S, tok_S, fp8=False):
    return torch.empty_like(h_S2I), torch.empty_like(top_k_weights_TK)


@torch.library.custom_op("scattermoe::experts_bwd_dx", mutates_args=())
def experts_bwd_dx(dh_S2I: torch.Tensor, x_TH: torch.Tensor, gate_up_E2IH: torch.Tensor, counts_E: torch.Tensor,
                   slot_S: torch.Tensor, tok_S: torch.Tensor, fp8: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(dX [T, H], d gate_up [E, 2I, H]): dX = (dH @ gate_up[e] scattered to slots).view(T, K, H).sum(1)."""
    T, H = x_TH.shape
    K = slot_S.numel() // T
    if fp8:
        # gate_up^T scaled over 2I per (expert, h), stored [E, H, 2I]; dH scaled per routed row.
        (dh_q, sdh_S), (w1t_q, s1t_EH) = quantize_rows(dh_S2I), quantize_cols_t(gate_up_E2IH)
        dx_SH = _scatter_matmul(dh_q, w1t_q, (w1t_q.stride(0), 1, w1t_q.shape[2]), slot_S, counts_E, H,
                                scales=(sdh_S, s1t_EH), out_dtype=x_TH.dtype, backward=True)
        del dh_q, w1t_q
    else:
        # gate_up[e] is [2I, H]: B[e][d=j, n=h] = gate_up[e, j, h].
        dx_SH = _scatter_matmul(dh_S2I, gate_up_E2IH, (gate_up_E2IH.stride(0), H, 1), slot_S, counts_E, H)
    # K-sum before d gate_up [E, 2I, H] is allocated: the [S, H] rows (0.27 GB at 8K tokens of Qwen3-30B-A3B; the
    # fp8 copies above 0.5 GB more) are not alive beside it.
    dx_TH = dx_SH.view(T, K, H).sum(1)
    del dx_SH
    d_gate_up = _expert_wgrad(dh_S2I, x_TH, torch.empty_like(gate_up_E2IH), counts_E, b_idx=tok_S)
    return dx_TH, d_gate_up


@experts_bwd_dx.register_fake
def _experts_bwd_dx_fake(dh_S2I, x_TH, gate_up_E2IH, counts_E, slot_S, tok_S, fp8=False):
    return torch.empty_like(x_TH), torch.empty_like(gate_up_E2IH)


@torch.library.custom_op("scattermoe::experts_bwd_ddown", mutates_args=())
def experts_bwd_ddown(dy_TH: torch.Tensor, aw_SI: torch.Tensor, down_EHI: torch.Tensor, counts_E: torch.Tensor,
                      tok_S: torch.Tensor) -> torch.Tensor:
    """d down [E, H, I] = sum over each expert's rows of dY[tok]^T aw (bf16: the weight gradients never run FP8)."""
    return _expert_wgrad(dy_TH, aw_SI, torch.empty_like(down_EHI), counts_E, a_idx=tok_S)


@experts_bwd_ddown.register_fake
def _experts_bwd_ddown_fake(dy_TH, aw_SI, down_EHI, counts_E, tok_S):
    return torch.empty_like(down_EHI)


def _backward_inputs(dy_TH, x_TH, top_k_weights_TK, slot_S):
    """dY in the experts' dtype and contiguous, and each sorted row's token (int32)."""
    K = top_k_weights_TK.shape[1]
    return (dy_TH.contiguous().to(x_TH.dtype),
            torch.div(slot_S, K, rounding_mode="floor").to(torch.int32))


def _setup_context(ctx, inputs, output):
    x_TH, gate_up_E2IH, down_EHI, _, top_k_weights_TK, fp8 = inputs
    _, h_S2I, aw_SI, counts_E, slot_S = output
    ctx.fp8 = fp8
    # h and aw are outputs only so that they can be saved; nothing downstream uses them, and autograd would otherwise
    # hand the backward zero-filled [S, 2I] and [S, I] gradients for them: two fills (90 us at 8K tokens of
    # Qwen3-30B-A3B on the H200) and 0.28 GiB allocated through each layer's experts backward, where an 8-layer step
    # with recomputed experts peaks: 42.02 -> 41.97 GiB (bench/results/train_step_h200_202611.md, runs 8 and 11).
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x_TH, gate_up_E2IH, down_EHI, top_k_weights_TK, h_S2I, aw_SI, counts_E, slot_S)


def _backward(ctx, dy_TH, _dh, _daw, _dcounts, _dslot):
    if dy_TH is None:  # Y took no part in the loss (gradients are not materialised as zeros: _setup_context)
        return None, None, None, None, None, None
    x_TH, gate_up_E2IH, down_EHI, top_k_weights_TK, h_S2I, aw_SI, counts_E, slot_S = ctx.saved_tensors
    dy_TH, tok_S = _backward_inputs(dy_TH, x_TH, top_k_weights_TK, slot_S)
    dh_S2I, d_weights = experts_bwd_dh(dy_TH, down_EHI, top_k_weights_TK, h_S2I, counts_E, slot_S, tok_S, ctx.fp8)
    del h_S2I  # see the note above experts_bwd_dh
    dx_TH, d_gate_up = experts_bwd_dx(dh_S2I, x_TH, gate_up_E2IH, counts_E, slot_S, tok_S, ctx.fp8)
    del dh_S2I
    d_down = experts_bwd_ddown(dy_TH, aw_SI, down_EHI, counts_E, tok_S)
    # One gradient per forward input: x, gate_up_proj, down_proj, top_k_index (integer: none), top_k_weights,
    # fp8 (a flag: none).
    return dx_TH, d_gate_up, d_down, None, d_weights, None


experts_fwd.register_autograd(_backward, setup_context=_setup_context)


def scattermoe_experts(x_TH, gate_up_E2IH, down_EHI, top_k_index_TK, top_k_weights_TK, fp8: bool = False
                       ) -> torch.Tensor:
    """Y [T, H] of the routed SwiGLU experts; x is cast to the weights' dtype (as transformers' grouped_mm does
    under autocast). top_k_index must lie in [0, E): no expert-parallel sentinels. fp8=True runs the forward and
    input-gradient GEMMs in e4m3 (see the module docstring; needs sm_89+ on a GPU)."""
    x_TH = x_TH.to(gate_up_E2IH.dtype).contiguous()
    return experts_fwd(x_TH, gate_up_E2IH.contiguous(), down_EHI.contiguous(), top_k_index_TK,
                       top_k_weights_TK, fp8)[0]

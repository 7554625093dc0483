"""Triton kernels of the fused ScatterMoE-style experts (idea: Tan et al., arXiv 2403.08245).

Shape legend (suffixes): T tokens, K top_k, E experts, H hidden, I moe intermediate, S = T*K routed rows,
D the reduction dim of one GEMM, N its output columns, R routed rows reduced over (weight gradients).

Routed rows are processed in expert-sorted order ("sorted row" r = 0..S-1); `slot` is the row's place in the
flattened [T*K] routing tensors and `tok = slot // K` its token. No permuted copy of X or dY is ever made:
the kernels gather rows by `tok` themselves and scatter results to `slot`.

Tiles never straddle two experts: each expert's rows are cut into ceil(count/BLOCK_M) tiles and the tile ->
(expert, first row) map is recomputed in every program from the [E] counts (a cumsum over E <= a few hundred
values), so BLOCK_M can be autotuned and nothing needs a host sync. The grid is launched for the upper bound
ceil(S/BLOCK_M) + E tiles; programs past the last tile exit at once.

FP8 (constexpr FP8 in the two row GEMMs): operands arrive as e4m3 with fp32 scales over the contraction dim
(fp8_quant.py), one per A row and one per (expert, output column) of B, so the scales factor out of the sum and the
epilogue multiplies acc by a_scale[:, None] * b_scale[None, :]. The weight gradients stay in the input dtype.
FP8_PROMOTE: on sm_90 Triton lets FP8 tensor-core dots accumulate in Hopper's reduced-precision accumulator over
the whole K loop (max_num_imprecise_acc defaults to 2^30 there: triton/backends/nvidia/compiler.py); with it set,
each K-tile's partial sum is added into the fp32 accumulator (max_num_imprecise_acc = BLOCK_D), as DeepSeek-V3's
FP8 GEMMs promote every 128 and torch._scaled_mm does with use_fast_accum=False.
"""

import triton
import triton.testing
import triton.language as tl


@triton.jit
def _expert_tile(pid_m, counts_ptr, E, E_P2: tl.constexpr, BLOCK_M: tl.constexpr):
    """(expert, first sorted row, one past the expert's last sorted row) of M-tile `pid_m`; start >= end if idle."""
    offs_e = tl.arange(0, E_P2)
    cnt = tl.load(counts_ptr + offs_e, mask=offs_e < E, other=0)
    tiles = (cnt + BLOCK_M - 1) // BLOCK_M
    tiles_end = tl.cumsum(tiles, 0)
    rows_end = tl.cumsum(cnt, 0)
    expert = tl.sum((tiles_end <= pid_m).to(tl.int32), 0)
    sel = offs_e == expert
    first_tile = tl.sum(tl.where(sel, tiles_end - tiles, 0), 0)
    row_end = tl.sum(tl.where(sel, rows_end, 0), 0)
    row_start = tl.sum(tl.where(sel, rows_end - cnt, 0), 0) + (pid_m - first_tile) * BLOCK_M
    return expert, row_start, row_end


@triton.jit
def _gather_matmul_variant_kernel(
    a_ptr, b_ptr, c_ptr, tok_ptr, counts_ptr, h_ptr, w_ptr, aux_ptr, a_scale_ptr, b_scale_ptr,
    S, E, N, D, stride_am, stride_be, stride_bd, stride_bn, S_BUCKET,
    E_P2: tl.constexpr, BACKWARD: tl.constexpr, DOT_PREC: tl.constexpr, EVEN_D: tl.constexpr, FP8: tl.constexpr,
    FP8_PROMOTE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SWIGLU_LEAN: tl.constexpr = False,
):
    """A[tok[r]] @ B[e(r)] for expert-sorted rows r (scattered -> grouped), N = I, with a SwiGLU epilogue.

    Forward (BACKWARD=False): A = X [T, H]; B[e][d, n] = gate_up_proj[e, n, d]. Each program computes the gate
    columns [n0, n0 + BLOCK_N) and the matching up columns I + [n0, ...) as two accumulators sharing every A
    load, so the epilogue holds both halves: it writes h [S, 2I] (c_ptr, kept for the backward) and
    aw [S, I] = w * silu(gate) * up (aux_ptr), the down GEMM's operand with the routing weight folded in.
    (Computing aw instead in the down GEMM's prologue, from h, ran at 196 TFLOP/s against 548 for the same
    GEMM on a stored operand: H200, 32K tokens, 2026-11-28; see bench/notes_scattermoe.md.)
    Backward (BACKWARD=True): A = dY [T, H]; B[e][d, n] = down_proj[e, d, n]; acc = g = dY[tok] @ down[e].
    The epilogue recomputes gate, up from h (h_ptr) and writes dH [S, 2I] (c_ptr) = SwiGLU backward of w * g,
    and the routing-weight gradient partials <g, silu(gate) * up> over this program's columns to
    aux_ptr [ceil(I / BLOCK_N), S] fp32 (one row per N-tile, summed by the caller: deterministic).
    FP8: A and B hold e4m3 values scaled over D; acc is rescaled by a_scale[tok] (fp32 [T]) times
    b_scale[e, col] (fp32 [E, 2I] forward, [E, I] backward) before the epilogue, which is unchanged.
    """
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    expert, row_start, row_end = _expert_tile(pid_m, counts_ptr, E, E_P2, BLOCK_M)
    if row_start >= row_end:
        return
    rows = row_start + tl.arange(0, BLOCK_M)
    rmask = rows < row_end
    # Rows past the expert's end gather token 0 (a valid row): their results are never stored, and the A loads
    # then need no row mask.
    tok = tl.load(tok_ptr + rows, mask=rmask, other=0).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    offs_d = tl.arange(0, BLOCK_D)
    a_ptrs = a_ptr + tok[:, None] * stride_am + offs_d[None, :]
    b_ptrs = b_ptr + expert.to(tl.int64) * stride_be + offs_d[:, None] * stride_bd + cols[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        if EVEN_D:
            a = tl.load(a_ptrs)
            bmask = cmask[None, :]
        else:
            a = tl.load(a_ptrs, mask=offs_d[None, :] < D - d0, other=0.0)
            bmask = (offs_d[:, None] < D - d0) & cmask[None, :]
        acc = tl.dot(a, tl.load(b_ptrs, mask=bmask, other=0.0), acc, input_precision=DOT_PREC,
                     max_num_imprecise_acc=BLOCK_D if FP8_PROMOTE else None)
        if not BACKWARD:
            b_up = tl.load(b_ptrs + N * stride_bn, mask=bmask, other=0.0)
            acc_up = tl.dot(a, b_up, acc_up, input_precision=DOT_PREC,
                            max_num_imprecise_acc=BLOCK_D if FP8_PROMOTE else None)
        a_ptrs += BLOCK_D
        b_ptrs += BLOCK_D * stride_bd
    if FP8:
        a_s = tl.load(a_scale_ptr + tok)[:, None]
        b_s_ptrs = b_scale_ptr + expert.to(tl.int64) * (N if BACKWARD else 2 * N) + cols
        acc = acc * (a_s * tl.load(b_s_ptrs, mask=cmask, other=0.0)[None, :])
        if not BACKWARD:
            acc_up = acc_up * (a_s * tl.load(b_s_ptrs + N, mask=cmask, other=0.0)[None, :])
    out_ty = c_ptr.dtype.element_ty
    mask2 = rmask[:, None] & cmask[None, :]
    rows64 = rows.to(tl.int64)
    c_ptrs = c_ptr + rows64[:, None] * (2 * N) + cols[None, :]
    w = tl.load(w_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    if BACKWARD:
        h_ptrs = h_ptr + rows64[:, None] * (2 * N) + cols[None, :]
        if SWIGLU_LEAN:
            # Coefficient tiles from h alone (w folded in), acc meets them in three products: fewer live fp32 tiles
            # (sm_90, triton 3.9: 248/248 B/thread spills at 128x128 8 warps against 1012/1228 for the order below).
            gate = tl.load(h_ptrs, mask=mask2, other=0.0).to(tl.float32)
            up = tl.load(h_ptrs + N, mask=mask2, other=0.0).to(tl.float32)
            sig = tl.sigmoid(gate)
            silu = gate * sig
            c_gate = up * (sig + silu * (1.0 - sig)) * w[:, None]  # d silu / d gate = sig * (1 + gate * (1 - sig))
            c_up = silu * w[:, None]
            tl.store(aux_ptr + pid_n * S + rows, tl.sum(acc * (silu * up), 1), mask=rmask)
            tl.store(c_ptrs, (acc * c_gate).to(out_ty), mask=mask2)
            tl.store(c_ptrs + N, (acc * c_up).to(out_ty), mask=mask2)
        else:
            gate = tl.load(h_ptrs, mask=mask2, other=0.0).to(tl.float32)
            up = tl.load(h_ptrs + N, mask=mask2, other=0.0).to(tl.float32)
            sig = tl.sigmoid(gate)
            silu = gate * sig
            tl.store(aux_ptr + pid_n * S + rows, tl.sum(acc * (silu * up), 1), mask=rmask)
            da = acc * w[:, None]
            tl.store(c_ptrs, (da * up * sig * (1.0 + gate * (1.0 - sig))).to(out_ty), mask=mask2)
            tl.store(c_ptrs + N, (da * silu).to(out_ty), mask=mask2)
    else:
        gate = acc.to(out_ty)
        up = acc_up.to(out_ty)
        tl.store(c_ptrs, gate, mask=mask2)
        tl.store(c_ptrs + N, up, mask=mask2)
        # From the stored (rounded) h, so the backward's recomputation from h sees the same values.
        gate = gate.to(tl.float32)
        aw = gate * tl.sigmoid(gate) * up.to(tl.float32) * w[:, None]
        tl.store(aux_ptr + rows64[:, None] * N + cols[None, :], aw.to(out_ty), mask=mask2)


@triton.jit
def _gather_matmul_kernel(
    a_ptr, b_ptr, c_ptr, tok_ptr, counts_ptr, h_ptr, w_ptr, aux_ptr, a_scale_ptr, b_scale_ptr,
    S, E, N, D, stride_am, stride_be, stride_bd, stride_bn, S_BUCKET,
    E_P2: tl.constexpr, BACKWARD: tl.constexpr, DOT_PREC: tl.constexpr, EVEN_D: tl.constexpr, FP8: tl.constexpr,
    FP8_PROMOTE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """_gather_matmul_variant_kernel with the default variant (the forward's launch; its signature has no switches,
    so ahead-of-time compiles, which pass every constexpr, need none)."""
    _gather_matmul_variant_kernel(a_ptr, b_ptr, c_ptr, tok_ptr, counts_ptr, h_ptr, w_ptr, aux_ptr, a_scale_ptr,
                                  b_scale_ptr, S, E, N, D, stride_am, stride_be, stride_bd, stride_bn, S_BUCKET,
                                  E_P2, BACKWARD, DOT_PREC, EVEN_D, FP8, FP8_PROMOTE, BLOCK_M, BLOCK_N, BLOCK_D, False)


@triton.jit
def _scatter_matmul_kernel(
    a_ptr, b_ptr, c_ptr, slot_ptr, counts_ptr, a_scale_ptr, b_scale_ptr,
    S, E, N, D, stride_am, stride_be, stride_bd, stride_bn, stride_cm, S_BUCKET,
    E_P2: tl.constexpr, DOT_PREC: tl.constexpr, EVEN_D: tl.constexpr, FP8: tl.constexpr, FP8_PROMOTE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """C[slot[r]] = A[r] @ B[e(r)] for expert-sorted rows r (grouped -> scattered).

    Forward down: A = aw [S, I], B[e][d, n] = down_proj[e, n, d]; C [S, H] in slot order, Y = C.view(T, K, H).sum(1).
    Backward dX: A = dH [S, 2I], B[e][d, n] = gate_up_proj[e, d, n]; C [S, H] in slot order, summed the same way.
    FP8: A, B hold e4m3 values scaled over D; acc is rescaled by a_scale[r] (fp32 [S]) * b_scale[e, n] (fp32 [E, H]).
    """
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    expert, row_start, row_end = _expert_tile(pid_m, counts_ptr, E, E_P2, BLOCK_M)
    if row_start >= row_end:
        return
    rows = row_start + tl.arange(0, BLOCK_M)
    rmask = rows < row_end
    # Out-of-tile rows re-read the tile's first row (in bounds, never stored), so A loads need no row mask.
    rows_safe = tl.where(rmask, rows, row_start).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    offs_d = tl.arange(0, BLOCK_D)
    a_ptrs = a_ptr + rows_safe[:, None] * stride_am + offs_d[None, :]
    b_ptrs = b_ptr + expert.to(tl.int64) * stride_be + offs_d[:, None] * stride_bd + cols[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        if EVEN_D:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs, mask=cmask[None, :], other=0.0)
        else:
            a = tl.load(a_ptrs, mask=offs_d[None, :] < D - d0, other=0.0)
            b = tl.load(b_ptrs, mask=(offs_d[:, None] < D - d0) & cmask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PREC, max_num_imprecise_acc=BLOCK_D if FP8_PROMOTE else None)
        a_ptrs += BLOCK_D
        b_ptrs += BLOCK_D * stride_bd
    if FP8:
        b_s = tl.load(b_scale_ptr + expert.to(tl.int64) * N + cols, mask=cmask, other=0.0)
        acc = acc * (tl.load(a_scale_ptr + rows_safe)[:, None] * b_s[None, :])
    slot = tl.load(slot_ptr + rows, mask=rmask, other=0).to(tl.int64)
    c_ptrs = c_ptr + slot[:, None] * stride_cm + cols[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _expert_wgrad_kernel(
    a_ptr, b_ptr, c_ptr, a_idx_ptr, b_idx_ptr, counts_ptr, order_ptr,
    E, M, N, stride_ar, stride_br, stride_ce, stride_cm, S_BUCKET,
    E_P2: tl.constexpr, A_GATHER: tl.constexpr, B_GATHER: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """C[e] [M, N] = sum over expert e's sorted rows r of A_row(r)^T B_row(r) (reduction over routed rows).

    dW2 = down_proj.grad [E, H, I]: A_row = dY[tok[r]] (A_GATHER), B_row = aw[r] (routing weight folded in).
    dW1 = gate_up_proj.grad [E, 2I, H]: A_row = dH[r], B_row = X[tok[r]] (B_GATHER).
    Experts are visited in `order` (most rows first) so that with skewed routing the long reductions start
    first instead of forming the tail. Experts with no rows get zeros.
    """
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_e = num_m * num_n
    expert = tl.load(order_ptr + pid // per_e)
    rest = pid % per_e
    pid_m = rest // num_n
    pid_n = rest % num_n
    offs_e = tl.arange(0, E_P2)
    cnt = tl.load(counts_ptr + offs_e, mask=offs_e < E, other=0)
    sel = offs_e == expert
    r_end = tl.sum(tl.where(sel, tl.cumsum(cnt, 0), 0), 0)
    r_start = r_end - tl.sum(tl.where(sel, cnt, 0), 0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = offs_m < M
    nmask = offs_n < N
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(r_start, r_end, BLOCK_R):
        rows = r0 + offs_r
        rmask = rows < r_end
        # The reduction runs over rows, so rows past the expert's end must load as zeros (masked), not as
        # another row's data.
        if A_GATHER:
            a_rows = tl.load(a_idx_ptr + rows, mask=rmask, other=0).to(tl.int64)
        else:
            a_rows = rows.to(tl.int64)
        a_t = tl.load(a_ptr + a_rows[None, :] * stride_ar + offs_m[:, None],
                      mask=rmask[None, :] & mmask[:, None], other=0.0)
        if B_GATHER:
            b_rows = tl.load(b_idx_ptr + rows, mask=rmask, other=0).to(tl.int64)
        else:
            b_rows = rows.to(tl.int64)
        b = tl.load(b_ptr + b_rows[:, None] * stride_br + offs_n[None, :], mask=rmask[:, None] & nmask[None, :],
                    other=0.0)
        acc = tl.dot(a_t, b, acc, input_precision=DOT_PREC)
    c_ptrs = c_ptr + expert.to(tl.int64) * stride_ce + offs_m[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


# ---- autotuning -----------------------------------------------------------------------------------------------
# Two to five Hopper tile configs per kernel, each one that won at least one routed-row count (S = 32K..512K rows,
# 4K..64K tokens) in the H200 run of bench/moe_block.py with TRITON_PRINT_AUTOTUNING=1 (2026-11-28, bench/results/
# moe_block_h200_202611.md); configs that never won were dropped, so autotuning stays short: a first H200 run with
# 3-5 configs per kernel (26 compiles) plus Liger's own autotuning did not finish a 32K-token benchmark in 200 s.
# fp32 (tests only) is pruned to one small config: 128x256 fp32 tiles overflow the 228 KB of shared memory.


def _cfg(bm, bn, bd, warps, stages, d_name="BLOCK_D", **variant):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, d_name: bd, **variant}, num_warps=warps, num_stages=stages)


# Forward gather: two [BLOCK_M, BLOCK_N] fp32 accumulators (gate and up), so 128 x 128 wants 8 warps. 4 stages
# (192 KB of shared memory) won at 4K tokens, 3 stages from 8K up.
GATE_UP_CONFIGS = [_cfg(128, 128, 64, 8, 3), _cfg(128, 128, 64, 8, 4)]
# Backward gather (dY@down + SwiGLU backward, the slowest GEMM). Compiled for sm_90 without a GPU (triton 3.9, ptxas -v,
# bench/sm90_compile_report.py, notes): every BLOCK_N=128 config spills with the plain epilogue (128x128 8 warps
# 1012/1228 B/thread); SWIGLU_LEAN cuts that to 248/248. On the H200 the lean 64x128 4-warp config won at every row
# count (2.98 -> 2.76 ms at 32K tokens); the plain configs and the lean 128x64 never won. The lean 128x128 stays for
# other model shapes. Any BLOCK_N works: the caller sizes the routing-weight partials for the smallest one listed.
SWIGLU_BWD_CONFIGS = [_cfg(64, 128, 64, 4, 4, SWIGLU_LEAN=True), _cfg(128, 128, 64, 8, 3, SWIGLU_LEAN=True)]
SCATTER_CONFIGS = [_cfg(128, 128, 64, 4, 4), _cfg(128, 256, 64, 8, 3)]
# The in-loop row-index load takes one pipeline stage: compiled for sm_90 (triton 3.9) 3 and 4 stages both get 2
# operand buffers (64 KB at 128x128x64), 5 stages 3 (96 KB). The 5-stage configs won the d gate_up wgrad at 8K and
# 32K tokens and the d down wgrad at 32K and 64K; each config here won at least one row count.
WGRAD_CONFIGS = [_cfg(128, 128, 64, 8, 3, "BLOCK_R"), _cfg(128, 128, 64, 4, 4, "BLOCK_R"),
                 _cfg(128, 256, 64, 8, 3, "BLOCK_R"), _cfg(128, 128, 64, 8, 5, "BLOCK_R"),
                 _cfg(128, 256, 64, 8, 5, "BLOCK_R")]
# FP8 (e4m3) forward / input-gradient GEMMs: FP8 wgmma takes K in steps of 32. BLOCK_D 128 is what the Triton fp8
# matmul tutorial uses on Hopper; 64 is also listed because compiled ahead of time for sm_90 on a CPU (triton 3.9,
# ptxas -v, 2026-11-28) BLOCK_D 128 doubled the spill stores of the gather/scatter GEMMs (their [BLOCK_M, BLOCK_D]
# tensors of gathered row pointers). Every variant lowered to warp_group_dot on f8E4M3FN (no mma_v2 fallback).
# Untuned first guesses: the first GPU session should look at which wins and prune.
GATE_UP_FP8_CONFIGS = [_cfg(128, 128, 128, 8, 3), _cfg(128, 128, 64, 8, 3), _cfg(128, 64, 64, 4, 4)]
SWIGLU_BWD_FP8_CONFIGS = [_cfg(128, 128, 128, 8, 3), _cfg(128, 128, 64, 8, 3), _cfg(64, 128, 64, 4, 4)]
SCATTER_FP8_CONFIGS = [_cfg(128, 128, 128, 4, 4), _cfg(128, 128, 64, 4, 4), _cfg(128, 256, 64, 8, 3)]
FP32_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_D": 32, "num_warps": 4, "num_stages": 2}
FP32_WGRAD_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_R": 32, "num_warps": 4, "num_stages": 2}


def _prune(fp32_config):
    def prune(configs, named_args, **kwargs):
        if named_args["a_ptr"].element_size() == 4:
            return [triton.Config({k: v for k, v in fp32_config.items() if k.startswith("BLOCK")},
                                  num_warps=fp32_config["num_warps"], num_stages=fp32_config["num_stages"])]
        return configs
    return prune


def _quick_bench(kernel_call, quantiles):
    # 5 ms warm-up / 25 ms of repeats instead of Triton's 25 / 100: tuning one key stays under a second.
    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


def _tuned(fn, configs, key, fp32_config=FP32_CONFIG):
    return triton.autotune(configs, key=key, do_bench=_quick_bench,
                           prune_configs_by={"early_config_prune": _prune(fp32_config)})(fn)


_even_d = triton.heuristics({"EVEN_D": lambda args: args["D"] % args["BLOCK_D"] == 0})
gather_matmul = _even_d(_gather_matmul_kernel)
gather_matmul_variant = _even_d(_gather_matmul_variant_kernel)
scatter_matmul = _even_d(_scatter_matmul_kernel)
expert_wgrad = _expert_wgrad_kernel
gate_up_tuned = _tuned(gather_matmul, GATE_UP_CONFIGS, ["N", "D", "S_BUCKET"])
swiglu_bwd_tuned = _tuned(gather_matmul_variant, SWIGLU_BWD_CONFIGS, ["N", "D", "S_BUCKET"])
scatter_matmul_tuned = _tuned(scatter_matmul, SCATTER_CONFIGS, ["N", "D", "S_BUCKET"])
gate_up_fp8_tuned = _tuned(gather_matmul, GATE_UP_FP8_CONFIGS, ["N", "D", "S_BUCKET"])
swiglu_bwd_fp8_tuned = _tuned(gather_matmul_variant, SWIGLU_BWD_FP8_CONFIGS, ["N", "D", "S_BUCKET"])
scatter_matmul_fp8_tuned = _tuned(scatter_matmul, SCATTER_FP8_CONFIGS, ["N", "D", "S_BUCKET"])
expert_wgrad_tuned = _tuned(expert_wgrad, WGRAD_CONFIGS, ["M", "N", "S_BUCKET", "A_GATHER", "B_GATHER"],
                            FP32_WGRAD_CONFIG)

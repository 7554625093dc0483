"""FP8 (e4m3) quantisation for the experts kernels: one fp32 scale per row along the GEMM's contraction dim.

Shape legend: G groups (experts, or 1), M rows that each get a scale, D the contraction dim scaled over.

Scale rule (the kernel and `quantize_ref` below agree bit for bit under the interpreter; on the GPU Triton's fp32
division is approximate, which rounding inv down to a power of two absorbs unless 448 / amax lies within a few ulp
of a power of two):
  amax = max |x| over D (clamped to >= 1e-12, so an all-zero row gets finite scales and quantises to zeros)
  inv  = 448 / amax rounded DOWN to a power of two (exponent bits kept, mantissa cleared)
  q    = clamp(x * inv, -448, 448) in e4m3;  scale = 1 / inv  (dequantised value = q * scale, exact)
Power-of-two scales (as torchao's rowwise recipe, `round_scales_to_power_of_2`) make x * inv and q * scale exact,
so the only rounding is e4m3's own (3 mantissa bits, relative error <= 2^-4); the row max lands in (224, 448]
rather than at 448, which costs no precision (e4m3 is floating point: relative spacing is the same in every binade)
and at most one binade of headroom at the bottom. 448 is e4m3fn's largest finite value; the clamp guards the row
max against that approximate division (a few ulp high can select the next power of two). Non-finite rows give NaN:
divergence is not hidden.

Two layouts, one kernel:
  quantize_rows(x [.., D])        -> q [.., D] fp8, scale [..] fp32       (activations; weights in the forward)
  quantize_cols_t(w [G, D, M])    -> q [G, M, D] fp8, scale [G, M] fp32  (weights in the backward: scaled over
                                     their first dim and transposed, so the contraction dim stays contiguous: FP8
                                     wgmma on Hopper wants both operands K-major, as the Triton fp8 matmul tutorial
                                     arranges with b.T)
"""
import torch
import triton
import triton.language as tl

FP8_MAX = 448.0
FP8_DTYPE = torch.float8_e4m3fn
_EXPONENT_BITS = 0x7F800000


@triton.jit
def _round_e4m3(q):
    """Round fp32 q (|q| <= 448) to the nearest e4m3 value (ties to even), still in fp32, so the final cast is
    exact. Needed because the Triton interpreter's fp32 -> fp8 cast drops the carry out of the mantissa (127.8
    became 64: triton 3.9, 2026-11-28); on the GPU the cast rounds correctly and this costs a few integer ops.
    Normal range: round the fp32 mantissa to its top 3 bits in integer arithmetic (the carry can bump the
    exponent). Below 2^-6 (e4m3 subnormals, spacing 2^-9): add and subtract 1.5 * 2^14, whose ulp is 2^-9."""
    bits = q.to(tl.int32, bitcast=True)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
    sub = (q + 24576.0) - 24576.0
    return tl.where(tl.abs(q) < 0.015625, sub, normal)


@triton.jit
def _inv_scale(amax):
    """448 / amax rounded down to a power of two (exponent bits kept); amax clamped so zero rows stay finite."""
    inv = 448.0 / tl.maximum(amax, 1e-12)
    return (inv.to(tl.int32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True)


@triton.jit
def _quantize_tile(x, inv, q_ty: tl.constexpr):
    return _round_e4m3(tl.minimum(tl.maximum(x * inv[:, None], -448.0), 448.0)).to(q_ty)


@triton.jit
def _quantize_kernel(x_ptr, q_ptr, s_ptr, M, D, stride_xg, stride_xm, stride_xd, stride_qg, stride_qm,
                     BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ONE_TILE: tl.constexpr):
    """Rows m of group g: q[g, m, :] (contiguous in d) and s[g * M + m] from x[g, m, :] (any strides).
    ONE_TILE (BLOCK_D >= D): the row is read once and kept in registers; otherwise two passes over D (amax, then
    quantise), the second mostly from L2."""
    pid_m = tl.program_id(0)
    g = tl.program_id(1).to(tl.int64)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    mmask = offs_m < M
    x_rows = x_ptr + g * stride_xg + offs_m[:, None] * stride_xm
    q_rows = q_ptr + g * stride_qg + offs_m[:, None] * stride_qm
    q_ty = q_ptr.dtype.element_ty
    if ONE_TILE:
        offs_d = tl.arange(0, BLOCK_D)
        mask = mmask[:, None] & (offs_d[None, :] < D)
        x = tl.load(x_rows + offs_d[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
        inv = _inv_scale(tl.max(tl.abs(x), 1))
        tl.store(q_rows + offs_d[None, :], _quantize_tile(x, inv, q_ty), mask=mask)
    else:
        amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask = mmask[:, None] & (offs_d[None, :] < D)
            x = tl.load(x_rows + offs_d[None, :] * stride_xd, mask=mask, other=0.0)
            amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), 1))
        inv = _inv_scale(amax)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask = mmask[:, None] & (offs_d[None, :] < D)
            x = tl.load(x_rows + offs_d[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
            tl.store(q_rows + offs_d[None, :], _quantize_tile(x, inv, q_ty), mask=mask)
    tl.store(s_ptr + g * M + offs_m, 1.0 / inv, mask=mmask)


def _launch(x, G, M, D, x_strides, out_dtype):
    q = torch.empty(G, M, D, device=x.device, dtype=out_dtype)
    s = torch.empty(G, M, device=x.device, dtype=torch.float32)
    if q.numel():
        # Untuned first guesses. Contiguous rows up to 4096 wide (every row here: H, I, 2I) in one tile of ~4096
        # elements per program, read once; longer rows in 8 x 512 tiles, two passes. Transposed reads (unit
        # m-stride): 64 x 64 tiles, two passes, so the loads (along m) and the stores (along d) stay coalesced.
        d_p2 = triton.next_power_of_2(D)
        one_tile = x_strides[2] == 1 and d_p2 <= 4096
        if one_tile:
            bm, bd = max(1, 4096 // d_p2), d_p2
        else:
            bm, bd = (8, 512) if x_strides[2] == 1 else (64, 64)
        bm, bd = min(bm, triton.next_power_of_2(M)), min(bd, d_p2)
        _quantize_kernel[(triton.cdiv(M, bm), G)](x, q, s, M, D, *x_strides, q.stride(0), q.stride(1),
                                                  BLOCK_M=bm, BLOCK_D=bd, ONE_TILE=one_tile, num_warps=4)
    return q, s


def quantize_rows(x: torch.Tensor, out_dtype: torch.dtype = FP8_DTYPE) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] (last dim contiguous, any float dtype) -> (q [..., D] out_dtype, scale [...] fp32)."""
    x2 = x.reshape(-1, x.shape[-1])
    assert x2.stride(-1) == 1
    q, s = _launch(x2, 1, x2.shape[0], x2.shape[1], (0, x2.stride(0), 1), out_dtype)
    return q.view(x.shape), s.view(x.shape[:-1])


def quantize_cols_t(w_GDM: torch.Tensor, out_dtype: torch.dtype = FP8_DTYPE) -> tuple[torch.Tensor, torch.Tensor]:
    """w [G, D, M] (any strides) -> (q [G, M, D] contiguous out_dtype, scale [G, M] fp32), scaled over D."""
    G, D, M = w_GDM.shape
    return _launch(w_GDM, G, M, D, (w_GDM.stride(0), w_GDM.stride(2), w_GDM.stride(1)), out_dtype)


def quantize_ref(x: torch.Tensor, dim: int = -1, out_dtype: torch.dtype = FP8_DTYPE):
    """Plain-torch version of the scale rule over `dim`: (q like x in out_dtype, scale with `dim` kept as size 1)."""
    amax = x.float().abs().amax(dim, keepdim=True).clamp_min(1e-12)
    inv = (FP8_MAX / amax).view(torch.int32).bitwise_and(_EXPONENT_BITS).view(torch.float32)
    q = (x.float() * inv).clamp(-FP8_MAX, FP8_MAX).to(out_dtype)
    return q, 1.0 / inv

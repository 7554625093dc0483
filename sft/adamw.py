"""AdamW in one Triton kernel per parameter, with gradient clipping folded into it.

Why: on the H200, 8 layers of Qwen3-30B-A3B (5.6 B parameters, bf16 weights and states), torch's fused AdamW took
28.9 ms per step (268 multi_tensor_apply launches, ~2.7 TB/s over the 78 GB it must read and write) and
clip_grad_norm_ 12.0 ms more (4.5 ms for the norms, 7.4 ms to rescale every gradient in place: another 22 GB):
30% of a 137-ms step's kernels (bench/results/train_step_h200_202611.md, run 6). Here the clipping factor is a
device scalar the AdamW kernel multiplies each gradient by as it reads it, so no pass rescales the gradients in
place, and the kernel streams p, g, m, v in and p, m, v out: 19.2 ms for the same step (~4.1 TB/s), 23.7 ms with
the norms. The whole step (same run): 1.08x with --recompute_experts false; unchanged with the default recompute,
whose forward, no longer hidden behind the optimizer's kernels, then waits for the host. The norms are our own
kernel too (`total_norm`): 2.55 ms per step where torch's took 4.5 (run 10).

Numerics are torch's AdamW (decoupled weight decay, bias corrections, eps added after the square root), computed in
fp32 and stored in the parameter's dtype, as torch's fused AdamW does. The state is torch's (`step`, a CPU tensor as
in torch's single-tensor and foreach AdamW, `exp_avg`, `exp_avg_sq`), so checkpoints move freely between this class
and torch.optim.AdamW. Plain tensors only: parameters sharded by FSDP2 (DTensor) or DeepSpeed keep torch's optimizer
(train.py decides).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096  # elements per program: 8 KB per bf16 stream, enough in flight to stream at HBM rate


@triton.jit
def _adamw_kernel(p_ptr, g_ptr, m_ptr, v_ptr, grad_factor_ptr, n, lr, beta1, beta2, eps, decay, step_size,
                  inv_sqrt_bias_correction2, HAS_FACTOR: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
    if HAS_FACTOR:
        g = g * tl.load(grad_factor_ptr)
    p = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask).to(tl.float32)
    p = p * decay  # decay = 1 - lr * weight_decay, applied before the Adam update (torch's order)
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * g * g
    p = p - step_size * m / (tl.sqrt(v) * inv_sqrt_bias_correction2 + eps)
    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)
    tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=mask)
    tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=mask)


class FusedAdamW(torch.optim.AdamW):
    """torch.optim.AdamW's hyperparameters and state; `step()` runs `_adamw_kernel` once per parameter.

    `scale_next_gradients(factor)` hands it a device scalar that the next `step()` multiplies every gradient by
    (the clipping coefficient of `clip_grad_norm`), without a host sync and without rewriting the gradients.
    Not supported: amsgrad, maximize, complex or sparse parameters, tensor learning rates.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=False, fused=False)
        self._grad_factor: torch.Tensor | None = None
        self.register_load_state_dict_post_hook(_steps_on_cpu)

    def scale_next_gradients(self, factor: torch.Tensor) -> None:
        self._grad_factor = factor.to(torch.float32).reshape(1)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        factor, self._grad_factor = self._grad_factor, None
        for group in self.param_groups:
            if group["amsgrad"] or group["maximize"] or torch.is_tensor(group["lr"]):
                raise ValueError("FusedAdamW supports neither amsgrad, maximize nor tensor learning rates: use "
                                 "torch.optim.AdamW for those")
            lr, (beta1, beta2), eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse or p.is_complex() or type(p.data) is not torch.Tensor:
                    raise ValueError(f"FusedAdamW takes dense real plain tensors, got {type(p.data).__name__} "
                                     f"{p.dtype}: use torch.optim.AdamW (FSDP2 and DeepSpeed shard parameters)")
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)  # on the CPU: read without a sync
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                step = float(state["step"])
                m, v = state["exp_avg"], state["exp_avg_sq"]
                if not (p.is_contiguous() and p.grad.is_contiguous() and m.is_contiguous() and v.is_contiguous()):
                    raise ValueError("FusedAdamW needs contiguous parameters, gradients and states")
                n = p.numel()
                _adamw_kernel[(triton.cdiv(n, BLOCK),)](
                    p, p.grad, m, v, factor if factor is not None else p.grad, n, lr, beta1, beta2, eps,
                    1.0 - lr * weight_decay, lr / (1.0 - beta1 ** step), (1.0 - beta2 ** step) ** -0.5,
                    HAS_FACTOR=factor is not None, BLOCK=BLOCK, num_warps=8)
        return loss


NORM_BLOCK = 8192  # elements per program of the sum of squares


@triton.jit
def _sum_squares_kernel(g_ptr, partial_ptr, n, BLOCK: tl.constexpr):
    """partial[program] = sum of the squares of this program's BLOCK elements of g, in fp32."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    g = tl.load(g_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(partial_ptr + tl.program_id(0), tl.sum(g * g, 0))


def total_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all `tensors` together (fp32 scalar on their device, no host sync): one sum-of-squares kernel per
    tensor into fp32 partials, then their sum, in a fixed order (deterministic). torch's get_total_norm (the
    multi_tensor_apply norm) read the 10.8 GB of bf16 gradients of 8 Qwen3-30B-A3B layers at ~2.4 TB/s on the H200
    (4.5 ms per step, bench/results/train_step_h200_202611.md, run 9); this kernel in 2.55 ms (~4.2 TB/s, run 10)."""
    if not tensors:
        return torch.zeros((), dtype=torch.float32)
    blocks = [triton.cdiv(t.numel(), NORM_BLOCK) for t in tensors]
    partials = torch.empty(sum(blocks), device=tensors[0].device, dtype=torch.float32)
    start = 0
    for tensor, count in zip(tensors, blocks):
        if not tensor.is_contiguous():
            raise ValueError("total_norm needs contiguous tensors")
        _sum_squares_kernel[(count,)](tensor, partials[start:start + count], tensor.numel(), BLOCK=NORM_BLOCK,
                                      num_warps=8)
        start += count
    return partials.sum().sqrt()


def _steps_on_cpu(optimizer: FusedAdamW) -> None:
    """A state saved by torch's fused AdamW keeps `step` on the GPU, and torch's loader leaves it there for a
    non-fused optimizer: `step()` would then sync with the GPU once per parameter to read it. Once, on loading."""
    for state in optimizer.state.values():
        if "step" in state and state["step"].device.type != "cpu":
            state["step"] = state["step"].to("cpu", torch.float32)


def clip_grad_norm(parameters, max_norm: float, optimizer) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ (the total norm and clipping coefficient, returned the same way), except that
    for a FusedAdamW the norm is `total_norm`'s (fp32 throughout, where torch rounds bf16 gradients' norms to bf16) and
    the coefficient goes to its next step instead of rescaling the gradients in place."""
    if not isinstance(optimizer, FusedAdamW):
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    norm = total_norm([p.grad for p in parameters if p.grad is not None])
    optimizer.scale_next_gradients(torch.clamp(max_norm / (norm + 1e-6), max=1.0))
    return norm

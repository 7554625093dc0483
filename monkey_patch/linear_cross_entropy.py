"""lm_head + cross-entropy in token chunks, gradients computed in the forward, with no host sync.

Why not Liger's (liger-kernel 0.8.5, ops/fused_linear_cross_entropy.py), which does the same chunked computation:
it reads the count of trained tokens to the host (`target_mask.sum().item()`) in its forward and compares
`grad_output` with 1.0 on the host (`torch.equal`, after copying 1.0 to the GPU) in its backward: 3 of the 4 host
syncs of our training step (bench/train_step.py --sync_debug, one H200). Each sync empties the GPU's queue, and the
next kernels then run as fast as the host launches them: the backward's first layers, launched right after the
second sync, are the step's GPU-idle stretch (bench/results/train_step_h200_202611.md, run 6). Here the scale
(1 / trained tokens) stays a device scalar that the kernel reads, and the backward multiplies the saved gradients by
`grad_output` on the GPU, whatever its value (0.3 ms for the [151936, 2048] lm_head gradient on an H200).

Per chunk of `chunk_tokens` tokens: logits = x W^T (bf16 GEMM into one reused buffer), then `_cross_entropy_kernel`,
one program per token, reads the row twice (online max and sum of exp; then softmax) and overwrites it with the
logits' gradient (softmax - onehot) * scale; then grad_x = G W and grad_W += G^T x (bf16, as Liger with its default
accum_dtype). 2,048-token chunks: 0.6 GB of transient logits at Qwen3's 151,936 vocabulary, and 4 weight-gradient
GEMMs of K=2048 per 8K tokens rather than 64 of K=128 (monkey_patch/liger.py, `ce_chunk_tokens`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

MAX_BLOCK = 32768  # columns per loop iteration of a row; 32 warps keep 32 fp32 values per thread (as Liger's kernel)


@triton.jit
def _cross_entropy_kernel(logits_ptr, logits_stride, target_ptr, loss_ptr, scale_ptr, n_cols, ignore_index,
                          WRITE_GRADIENT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_stride
    target = tl.load(target_ptr + row)
    cols = tl.arange(0, BLOCK)
    row_max, sum_exp = float("-inf"), 0.0  # online softmax: the running max and the sum of exp(x - running max)
    for start in range(0, n_cols, BLOCK):
        x = tl.load(row_ptr + start + cols, mask=start + cols < n_cols, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(row_max, tl.max(x, 0))
        sum_exp = sum_exp * tl.exp(row_max - new_max) + tl.sum(tl.exp(x - new_max), 0)
        row_max = new_max
    lse = row_max + tl.log(sum_exp)
    trained = target != ignore_index
    target_logit = tl.load(row_ptr + target, mask=trained, other=0.0).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(trained, lse - target_logit, 0.0))
    if WRITE_GRADIENT:
        scale = tl.where(trained, tl.load(scale_ptr), 0.0)
        for start in range(0, n_cols, BLOCK):
            mask = start + cols < n_cols
            x = tl.load(row_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
            grad = (tl.exp(x - lse) - tl.where(start + cols == target, 1.0, 0.0)) * scale
            tl.store(row_ptr + start + cols, grad.to(logits_ptr.dtype.element_ty), mask=mask)


def _loss_and_gradients(hidden, weight, target, scale, ignore_index, chunk_tokens, grad_hidden_needed,
                        grad_weight_needed):
    """sum over tokens of CE * scale, and its gradients with respect to hidden [N, H] and weight [V, H]."""
    tokens, vocab = hidden.shape[0], weight.shape[0]
    write_gradient = grad_hidden_needed or grad_weight_needed
    losses = torch.empty(tokens, dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if grad_hidden_needed else None
    grad_weight = torch.empty_like(weight) if grad_weight_needed else None
    logits_buffer = torch.empty(min(chunk_tokens, tokens), vocab, dtype=hidden.dtype, device=hidden.device)
    block = min(MAX_BLOCK, triton.next_power_of_2(vocab))
    for start in range(0, tokens, chunk_tokens):
        end = min(start + chunk_tokens, tokens)
        x, logits = hidden[start:end], logits_buffer[:end - start]
        torch.mm(x, weight.t(), out=logits)
        _cross_entropy_kernel[(end - start,)](logits, logits.stride(0), target[start:end], losses[start:end], scale,
                                              vocab, ignore_index, WRITE_GRADIENT=write_gradient, BLOCK=block,
                                              num_warps=32)
        if grad_hidden_needed:
            torch.mm(logits, weight, out=grad_hidden[start:end])
        if grad_weight_needed:  # the first chunk writes the buffer, the next ones add to it: no zero-fill pass
            torch.mm(logits.t(), x, out=grad_weight) if start == 0 else grad_weight.addmm_(logits.t(), x)
    return losses.sum() * scale[0], grad_hidden, grad_weight  # a new 0-dim tensor: callers add to it in place


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i W^T, target_i) * scale for hidden [N, H], weight [V, H], target [N], scale a 1-element
    float32 tensor on the GPU (1 / number of trained tokens). The gradients are computed in the forward and kept
    until the backward (one [V, H] and one [N, H] buffer); a second backward through the same graph is refused."""

    @staticmethod
    def forward(ctx, hidden, weight, target, scale, ignore_index: int, chunk_tokens: int):
        loss, grad_hidden, grad_weight = _loss_and_gradients(hidden, weight, target, scale, ignore_index,
                                                             chunk_tokens, ctx.needs_input_grad[0],
                                                             ctx.needs_input_grad[1])
        ctx.gradients = (grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.gradients is None:
            raise RuntimeError("LinearCrossEntropy keeps its gradients for one backward; retain_graph is not supported")
        grad_hidden, grad_weight = ctx.gradients
        ctx.gradients = None
        # In place: these buffers are ours alone. grad_loss is 1.0 when the loss is the graph's root; reading it on
        # the host to skip the multiplications would be a sync.
        for grad in (grad_hidden, grad_weight):
            if grad is not None:
                grad.mul_(grad_loss)
        return grad_hidden, grad_weight, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                         num_items_in_batch: torch.Tensor | int | None = None, ignore_index: int = -100,
                         chunk_tokens: int = 2048) -> torch.Tensor:
    """CE of hidden [N, H] @ weight[V, H]^T against target [N] (ignore_index: not trained): summed over tokens and
    divided by `num_items_in_batch` (a tensor stays on its device), or the mean over trained tokens when None, as
    transformers' ForCausalLMLoss. float32 scalar. Needs CUDA (a Triton kernel; TRITON_INTERPRET=1 runs it on a CPU).
    Zero trained tokens give nan, as torch's mean over nothing does."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1] or target.shape != hidden.shape[:1]:
        raise ValueError(f"linear_cross_entropy takes hidden [N, H], weight [V, H], target [N]; got "
                         f"{tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(target.shape)}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens}: a number of tokens, 1 or more")
    if num_items_in_batch is None:
        count = (target != ignore_index).sum()
    elif torch.is_tensor(num_items_in_batch):
        count = num_items_in_batch.to(hidden.device, non_blocking=True)
    else:  # a Python number: filled on the GPU, not copied from the host
        count = torch.full((), num_items_in_batch, device=hidden.device)
    scale = (1.0 / count.to(torch.float32)).reshape(1)
    with torch.autocast(hidden.device.type, enabled=False):  # the GEMMs run in the weight's dtype, autocast or not
        return LinearCrossEntropy.apply(hidden.to(weight.dtype).contiguous(), weight, target.contiguous(), scale,
                                        ignore_index, chunk_tokens)


def causal_lm_loss(chunk_tokens: int):
    """A drop-in for Liger's LigerForCausalLMLoss (what liger 0.8.5's qwen3_moe.lce_forward calls in training):
    labels shifted by one as transformers does, or `shift_labels` as given; then `linear_cross_entropy`. Options
    this kernel does not have (logit softcapping, token accuracy, predicted tokens) raise: Qwen3-MoE uses none."""

    def loss(hidden_states, lm_head_weight, labels, hidden_size, num_items_in_batch=None, ignore_index=-100,
             shift_labels=None, final_logit_softcapping=None, return_token_accuracy=False,
             return_predicted_tokens=False, **kwargs):
        if final_logit_softcapping is not None or return_token_accuracy or return_predicted_tokens:
            raise NotImplementedError("our fused linear cross-entropy has no logit softcapping, token accuracy or "
                                      "predicted tokens: run with --ce_kernel liger")
        if shift_labels is None:
            shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        return linear_cross_entropy(hidden_states.reshape(-1, hidden_size), lm_head_weight,
                                    shift_labels.reshape(-1).to(hidden_states.device), num_items_in_batch,
                                    ignore_index, chunk_tokens)

    loss.chunk_tokens = chunk_tokens
    return loss

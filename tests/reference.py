"""Plain-torch reference of a routed SwiGLU experts layer (shared by tests and benchmarks).

Shape legend: T tokens, K top_k, E experts, H hidden, I moe intermediate.
Loops over experts with the textbook formula y_t = sum_k w_tk * down[e] (silu(gate[e] x_t) * up[e] x_t), in
whatever dtype it is given (pass float64 tensors for a high-precision reference); autograd gives the gradients.
"""
import pytest
import torch
import torch.nn.functional as F

# The Triton interpreter runs our kernels on a CPU; on a GPU the compiled kernels are tested instead. The H200 image's
# triton 3.6 interpreter also fails on a loop bound passed as a kernel argument ("InterpreterError: only 0-dimensional
# arrays can be converted to Python scalars", range(0, D, BLOCK_D), seen 2026-11-28).
interpreter_only = pytest.mark.skipif(torch.cuda.is_available(),
                                      reason="CPU-only check: on a GPU the compiled kernels are tested instead")


def experts_reference(x_TH, gate_up_E2IH, down_EHI, top_k_index_TK, top_k_weights_TK) -> torch.Tensor:
    """[T, H] output; gate_up rows [0, I) are the gate, [I, 2I) the up projection (Qwen3MoeExperts layout)."""
    out_TH = torch.zeros_like(x_TH)
    for e in range(gate_up_E2IH.shape[0]):
        tok, kpos = torch.where(top_k_index_TK == e)
        if tok.numel() == 0:
            continue
        gate, up = F.linear(x_TH[tok], gate_up_E2IH[e]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, down_EHI[e]) * top_k_weights_TK[tok, kpos, None]
        out_TH = out_TH.index_add(0, tok, y)
    return out_TH


def random_problem(T, E, K, H, I, dtype=torch.float32, device="cpu", skew=0.0, generator=None, scale=1.0):
    """Random experts problem: x [T, H], gate_up [E, 2I, H], down [E, H, I], top-k routing [T, K] (distinct experts
    per token, softmax-normalised weights). skew > 0 draws experts with Zipf-like probabilities (rank^-skew,
    ranks randomly permuted), skew = 0 uniformly. Never zeros: real data paths only."""
    g = generator
    x = torch.randn(T, H, generator=g) * scale
    gate_up = torch.randn(E, 2 * I, H, generator=g) / H ** 0.5
    down = torch.randn(E, H, I, generator=g) / I ** 0.5
    probs = torch.arange(1, E + 1, dtype=torch.float64) ** -skew
    probs = probs[torch.randperm(E, generator=g)]
    idx = torch.multinomial(probs.expand(T, E), K, replacement=False, generator=g)
    w = torch.softmax(torch.randn(T, K, generator=g), dim=-1)
    return [t.to(device=device, dtype=dtype) for t in (x, gate_up, down)] + [idx.to(device), w.to(device, dtype)]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64."""
    ref = ref.double()
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()

"""The `scattermoe` experts implementation for transformers' experts interface (Qwen3-MoE and alike).

Shape legend: T tokens, K top_k, E experts, H hidden, I moe intermediate, S = T*K routed rows.

Contract (transformers 5.17 integrations/moe.py, `grouped_mm_experts_forward`): called as
`fn(experts_module, hidden_states [T, H], top_k_index [T, K], top_k_weights [T, K]) -> [T, H]`, with
`experts_module.gate_up_proj [E, 2I, H]` (gate rows first, then up), `.down_proj [E, H, I]`, SiLU gating.
CUDA tensors take the fused Triton path (ops.py); any other device takes a plain-torch path with the same math
(sorted by expert, one matmul pair per expert), so CPU runs and tests exercise the wiring.
`scattermoe_fp8` is the same with the forward and input-gradient GEMMs in FP8 e4m3 (ops.py docstring); it needs a
GPU of compute capability 8.9+ and raises on older ones; off CUDA it runs the same plain-torch path (no FP8).
"""
import functools

import torch
import torch.nn.functional as F

from .ops import routing_metadata, scattermoe_experts


def _check_supported(module: torch.nn.Module) -> None:
    """Raise (with the fix) for expert layouts the kernels do not implement."""
    if getattr(module, "has_bias", False) or not getattr(module, "has_gate", True):
        raise NotImplementedError("experts_implementation='scattermoe' supports gated experts without bias; "
                                  "use experts_implementation='grouped_mm' for this model")
    if getattr(module, "is_transposed", False) or not getattr(module, "is_concatenated", True):
        raise NotImplementedError("experts_implementation='scattermoe' expects gate_up_proj [E, 2I, H] with gate rows "
                                  "first; use experts_implementation='grouped_mm' for this model")
    act = getattr(getattr(module, "config", None), "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise NotImplementedError(f"experts_implementation='scattermoe' implements SiLU gating, not {act!r}; "
                                  "use experts_implementation='grouped_mm'")


def torch_experts(x_TH, gate_up_E2IH, down_EHI, top_k_index_TK, top_k_weights_TK) -> torch.Tensor:
    """Plain-torch version of the fused path: same routing metadata, same [S, H] slot buffer and K-sum."""
    T, H = x_TH.shape
    K = top_k_index_TK.shape[1]
    E = gate_up_E2IH.shape[0]
    x_TH = x_TH.to(gate_up_E2IH.dtype)
    counts_E, slot_S = routing_metadata(top_k_index_TK, E)
    x_SH = x_TH[torch.div(slot_S, K, rounding_mode="floor")]
    w_S = top_k_weights_TK.reshape(-1)[slot_S]
    rows = []
    for e, (start, end) in enumerate(zip([0] + counts_E.cumsum(0).tolist()[:-1], counts_E.cumsum(0).tolist())):
        if end > start:
            gate, up = F.linear(x_SH[start:end], gate_up_E2IH[e]).chunk(2, dim=-1)
            rows.append(F.linear(F.silu(gate) * up, down_EHI[e]))
    y_SH = torch.cat(rows) * w_S[:, None].to(x_TH.dtype) if rows else x_SH.new_zeros(0, H)
    buf_SH = y_SH.new_zeros(T * K, H).index_copy(0, slot_S, y_SH)
    return buf_SH.view(T, K, H).sum(1)


def scattermoe_experts_forward(self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                               top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers experts function: [T, H] hidden states, [T, K] routing -> [T, H] (hidden_states' dtype)."""
    _check_supported(self)
    impl = scattermoe_experts if hidden_states.device.type == "cuda" else torch_experts
    out = impl(hidden_states, self.gate_up_proj, self.down_proj, top_k_index, top_k_weights)
    return out.to(hidden_states.dtype)


@functools.cache
def _check_fp8_capability(device_index: int) -> None:
    major, minor = torch.cuda.get_device_capability(device_index)
    if (major, minor) < (8, 9):
        raise RuntimeError(f"experts_implementation='scattermoe_fp8' needs FP8 tensor cores (compute capability 8.9+: "
                           f"Ada, Hopper, Blackwell); {torch.cuda.get_device_name(device_index)} is sm_{major}{minor}: "
                           "use experts_implementation='scattermoe'")


def scattermoe_fp8_experts_forward(self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                                   top_k_weights: torch.Tensor) -> torch.Tensor:
    """As scattermoe_experts_forward, with e4m3 GEMMs for the forward and input gradients on CUDA."""
    _check_supported(self)
    if hidden_states.device.type != "cuda":
        return scattermoe_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    if not torch.compiler.is_compiling():  # keep the traced graph free of the host-side query (apply_fp8 checks too)
        _check_fp8_capability(hidden_states.device.index or 0)
    out = scattermoe_experts(hidden_states, self.gate_up_proj, self.down_proj, top_k_index, top_k_weights, fp8=True)
    return out.to(hidden_states.dtype)

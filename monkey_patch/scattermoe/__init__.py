"""Fused ScatterMoE-style experts for transformers MoE models (Triton on CUDA, plain torch elsewhere).

Importing this package registers the experts implementations "scattermoe" and "scattermoe_fp8" (the forward
and input-gradient GEMMs in FP8 e4m3, GPU sm_89+) with transformers (registration only: no class is swapped).
Select one with `model.set_experts_implementation("scattermoe")` or
`from_pretrained(..., experts_implementation="scattermoe")` / `from_config(cfg, experts_implementation=...)`.

Files: kernels.py (Triton kernels + autotune configs) <- ops.py (launchers, autograd, torch.library custom ops)
<- experts.py (the transformers-facing function and the plain-torch path); fp8_quant.py (e4m3 quantisation).
"""
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from monkey_patch.kept_experts import experts_forward_keeping_activations
from .experts import scattermoe_experts_forward, scattermoe_fp8_experts_forward, torch_experts
from .ops import routing_metadata, scattermoe_experts

# Registered wrapped for --recompute_experts false (monkey_patch/kept_experts.py): a no-op on modules it did not mark.
ALL_EXPERTS_FUNCTIONS.register("scattermoe", experts_forward_keeping_activations(scattermoe_experts_forward))
ALL_EXPERTS_FUNCTIONS.register("scattermoe_fp8", experts_forward_keeping_activations(scattermoe_fp8_experts_forward))

__all__ = ["scattermoe_experts_forward", "scattermoe_fp8_experts_forward", "scattermoe_experts", "torch_experts",
           "routing_metadata"]

"""Selective FP8 training of the dense linears through torchao (`torchao.float8`).

What is converted: the attention projections (q/k/v/o) of every decoder layer except the first and the last.
What stays bf16, and why:
  - the first and last decoder layers: they see the raw embedding and feed the logits, where quantisation error is
    least damped (the reference repo's selective recipe);
  - every router (`mlp.gate`): top-k selection is discontinuous, so small errors in the logits flip expert choices;
  - `lm_head` and the embeddings: the 151,936-way softmax is sensitive to logit error, and the embedding is a lookup;
  - any linear whose in/out features are not multiples of 16: FP8 GEMMs (cuBLAS/CUTLASS) require it.
The experts' fused weights are not nn.Linear modules: FP8 for them lives in our experts kernel.

Recipes (torchao names): `tensorwise` (one dynamic scale per tensor, cuBLAS; fastest), `rowwise` (one scale per row,
CUTLASS; more accurate), `rowwise_with_gw_hp` (rowwise, weight gradients kept in bf16; most accurate).
torchao builds its cast kernels with torch.compile: compile the decoder layers when using FP8 (torchao issue #685).
"""
from __future__ import annotations

import logging
import re

import torch
from torch import nn

from monkey_patch.errors import PatchError

logger = logging.getLogger(__name__)

RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def should_convert(module: nn.Module, fqn: str, num_layers: int) -> bool:
    """Whether the module at `fqn` trains in FP8 (pure: depends only on its arguments)."""
    if not isinstance(module, nn.Linear):
        return False
    if module.in_features % 16 or module.out_features % 16:
        return False
    layer = _LAYER.search(fqn)
    if layer is None:  # lm_head and anything outside the decoder stack
        return False
    if int(layer.group(1)) in (0, num_layers - 1):
        return False
    return not re.search(r"\.mlp\.gate(\.|$)", fqn)  # routers stay bf16 whatever their class


def fp8_module_names(model: nn.Module) -> list[str]:
    num_layers = model.config.num_hidden_layers
    return [name for name, module in model.named_modules() if should_convert(module, name, num_layers)]


def check_fp8_device() -> None:
    if not torch.cuda.is_available():
        raise PatchError("--fp8 needs a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper, Blackwell); "
                         "run without --fp8 here")
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        raise PatchError(f"--fp8 needs compute capability 8.9 or newer (Ada, Hopper, Blackwell); "
                         f"{torch.cuda.get_device_name()} is sm_{major}{minor}: run without --fp8")


def apply_fp8(model: nn.Module, recipe: str = "tensorwise", emulate: bool = False) -> dict:
    """Swap the selected nn.Linear modules for torchao Float8Linear, in place; idempotent.

    `emulate=True` runs the FP8 casts in plain torch (tests on a CPU); training uses the real kernels.
    """
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    if recipe not in RECIPES:
        raise PatchError(f"--fp8_recipe {recipe!r}: choose one of {', '.join(RECIPES)}")
    if not emulate:
        check_fp8_device()
    config = Float8LinearConfig.from_recipe_name(recipe)
    if emulate:
        config = Float8LinearConfig(**{**config.__dict__, "emulate": True})
    modules = dict(model.named_modules())
    names = [name for name in fp8_module_names(model) if type(modules[name]) is nn.Linear]  # not yet converted
    selected = set(names)
    convert_to_float8_training(model, config=config, module_filter_fn=lambda module, fqn: fqn in selected)
    logger.info("fp8 (%s): %d linears converted, first/last layers, routers, lm_head and embeddings kept in bf16",
                recipe, len(names))
    return {"recipe": recipe, "converted": len(names)}

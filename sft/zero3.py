"""The recommended ZeRO-3 `stage3_module_granularity_threshold` for a model config.

  python -m sft.zero3 --model_name_or_path qwen3-30b-a3b          # a preset of config/models/
  python -m sft.zero3 --model_name_or_path Qwen/Qwen3-30B-A3B     # a hub id or local checkpoint (config.json only)

DeepSpeed 0.19.8 (deepspeed/runtime/zero/parameter_offload.py, `_get_granularity_recursively`) gives every module that
is neither a container (ModuleList, ...) nor a parameter-free or childless module a granularity of
`parameters in its subtree // (1 + modules with parameters below it)`, and with a threshold > 0 it turns every module
whose granularity is <= the threshold into a leaf, parents first: a leaf's parameters are gathered in one go and its
children get no fetch/release hooks. When the threshold is below every granularity it logs "you need to set
stage3_module_granularity_threshold >= <smallest granularity>". That smallest granularity is what we recommend: it is
what DeepSpeed asks for, the reference repo's value (1,175,567 = the MoE block of Qwen3-30B-A3B when its 128 experts
were 384 nn.Linear modules: 604,241,920 // 514), and it never makes a whole decoder layer a leaf (checked and reported).

Transformers 5 fuses the experts into two parameters, so the MoE block has few hooks anyway and the smallest
granularity is now the attention block's. The MoE block itself is a leaf through config/zero3.json's `leaf_module`
(and DeepSpeed's defaults), whatever the threshold. The model is built on the meta device: no memory, no download of
weights.
"""
from __future__ import annotations

import argparse
import sys

import torch
from torch import nn

MOE_BLOCK = "Qwen3MoeSparseMoeBlock"
DECODER_LAYER = "Qwen3MoeDecoderLayer"


def granularities(model: nn.Module) -> dict[str, int]:
    """{module name: granularity} for the modules DeepSpeed rates (the rule in the module docstring)."""
    rated: dict[str, int] = {}

    def visit(name: str, module: nn.Module) -> tuple[int, int]:  # (modules with parameters, parameters) in subtree
        if not any(True for _ in module.parameters()):
            return 0, 0
        own = sum(p.numel() for p in module.parameters(recurse=False))
        children = list(module.named_children())
        if not children:
            return 1, own
        layers, params = 0, own
        for child_name, child in children:
            child_layers, child_params = visit(f"{name}.{child_name}" if name else child_name, child)
            layers, params = layers + child_layers, params + child_params
        if type(module).__name__ in nn.modules.container.__all__:
            return layers, params
        layers += 1
        if params <= 1e9:  # DeepSpeed's Z3_MAX_LEAF_SIZE: larger subtrees are never leaves
            rated[name] = params // layers
        return layers, params

    visit("", model)
    return rated


def leaves_at(model: nn.Module, rated: dict[str, int], threshold: int) -> list[str]:
    """Module names DeepSpeed would turn into leaves at `threshold` (parents first, as it does)."""
    leaves: list[str] = []

    def visit(name: str, module: nn.Module) -> None:
        if name in rated and rated[name] <= threshold:
            leaves.append(name)
            return
        for child_name, child in module.named_children():
            visit(f"{name}.{child_name}" if name else child_name, child)

    visit("", model)
    return leaves


def recommend(model: nn.Module) -> tuple[int, dict[str, int], list[str]]:
    """(recommended threshold, granularity per rated module, modules that become leaves at it)."""
    rated = granularities(model)
    threshold = min(rated.values())
    leaves = leaves_at(model, rated, threshold)
    whole_layers = [n for n in leaves if type(model.get_submodule(n)).__name__ == DECODER_LAYER]
    if whole_layers:
        raise ValueError(f"the smallest granularity {threshold} would make whole decoder layers ZeRO-3 leaves "
                         f"({whole_layers[0]}, ...): set stage3_module_granularity_threshold below it by hand")
    return threshold, rated, leaves


def meta_model(name_or_path: str, num_hidden_layers: int | None = None) -> nn.Module:
    """The model of a preset, hub id or local directory, built on the meta device from its config alone."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from sft.model import is_preset, preset_config

    overrides = {"num_hidden_layers": num_hidden_layers} if num_hidden_layers else {}
    if is_preset(name_or_path):
        config = preset_config(name_or_path, **overrides)
    else:
        config = AutoConfig.from_pretrained(name_or_path, **overrides)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_name_or_path", default="qwen3-30b-a3b", help="preset, hub id or local directory")
    parser.add_argument("--num_hidden_layers", type=int, default=None, help="presets and configs: override layers")
    args = parser.parse_args(argv)
    model = meta_model(args.model_name_or_path, args.num_hidden_layers)
    threshold, rated, leaves = recommend(model)
    by_class: dict[str, int] = {}
    for name, value in rated.items():
        by_class.setdefault(type(model.get_submodule(name)).__name__, value)
    print(f"{'module class'.ljust(32)}{'granularity'.rjust(14)}")
    for cls, value in sorted(by_class.items(), key=lambda kv: kv[1]):
        print(f"{cls.ljust(32)}{value:>14,}")
    leaf_classes = sorted({type(model.get_submodule(n)).__name__ for n in leaves})
    print(f"leaves at the threshold: {len(leaves)} modules ({', '.join(leaf_classes)}); "
          f"{MOE_BLOCK} is a leaf through leaf_module in config/zero3.json")
    print(f'"stage3_module_granularity_threshold": {threshold}')
    return 0


if __name__ == "__main__":
    sys.exit(main())

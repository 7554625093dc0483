"""Supervised fine-tuning of Qwen3-MoE models: parse -> tokenizer and data -> model -> patches -> Trainer.train().

  bash qwen3_sft.sh                                    # the bundled default: tiny preset, bundled data, CPU or GPU
  python train.py --config config/recipes/tiny.yaml    # the same, without the launcher
  RECIPE=config/recipes/qwen3-30b-a3b.yaml bash qwen3_sft.sh --dataset Yukang/LongAlpaca-12k   # one node, all GPUs
  NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash qwen3_sft_multinode.sh ...                       # on every node

Flags: the standard TrainingArguments plus those of sft/arguments.py (`python train.py --help`).
"""
from __future__ import annotations

import logging
import os
import re
import sys

import torch

if not torch.cuda.is_available():
    # torchao's wheel links its C++ parts against CUDA; on a CPU they fail to load noisily (its Python API still works).
    os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")

import transformers  # noqa: E402

from monkey_patch import apply_patches  # noqa: E402
from sft.arguments import parse_arguments  # noqa: E402
from sft.callbacks import EfficiencyCallback, add_efficiency_callback  # noqa: E402
from sft.collate import PackedCollator, PaddedCollator, mean_causal_context, pack_examples  # noqa: E402
from sft.data import DataError, load_conversations  # noqa: E402
from sft.metrics import detect_peak_tflops, flops_per_token  # noqa: E402
from sft.model import load_model, load_tokenizer  # noqa: E402
from sft.render import tokenize_conversations  # noqa: E402
from sft.trainer import SFTTrainer  # noqa: E402

logger = logging.getLogger("train")


def setup_logging(training_args) -> None:
    level = training_args.get_process_log_level()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level, stream=sys.stdout)
    transformers.utils.logging.set_verbosity(level)


def build_training_data(data_args, tokenizer):
    """(train dataset, collator, mean causal attention context per token) for the Trainer."""
    conversations = load_conversations(data_args.dataset, data_args.data_format, data_args.dataset_split,
                                       data_args.skip_bad_rows)
    tokenized = tokenize_conversations(tokenizer, conversations.messages, data_args.max_seq_length,
                                       data_args.assistant_only_loss)
    context = mean_causal_context(tokenized.examples)
    if data_args.packing:
        return pack_examples(tokenized.examples, data_args.max_seq_length), PackedCollator(), context
    return tokenized.examples, PaddedCollator(pad_token_id=tokenizer.pad_token_id), context


def latest_checkpoint(output_dir: str) -> str | None:
    """The newest checkpoint-N of output_dir that holds trainer_state.json. The Trainer writes that file last (after the
    model, optimizer and RNG shards), so a run killed while saving leaves a newer folder without it: skip that one."""
    steps = [int(m.group(1)) for name in (os.listdir(output_dir) if os.path.isdir(output_dir) else [])
             if (m := re.fullmatch(r"checkpoint-(\d+)", name))
             and os.path.isfile(os.path.join(output_dir, name, "trainer_state.json"))]
    return os.path.join(output_dir, f"checkpoint-{max(steps)}") if steps else None


def resolve_resume(training_args) -> str | None:
    """`--resume_from_checkpoint latest` (or true) resumes from the newest complete checkpoint-N in output_dir."""
    requested = training_args.resume_from_checkpoint
    if requested in (None, "", "false", "False"):
        return None
    if requested in ("latest", "true", "True"):
        last = latest_checkpoint(training_args.output_dir)
        if last is None:
            raise FileNotFoundError(f"--resume_from_checkpoint {requested}: no complete checkpoint-N folder in "
                                    f"{training_args.output_dir}; start without it or pass a checkpoint path")
        return last
    if not os.path.isdir(requested):
        raise FileNotFoundError(f"--resume_from_checkpoint {requested}: no such checkpoint folder")
    return requested


def fsdp_checkpoints_activations(training_args) -> bool:
    """FSDP's activation checkpointing is on (config/accelerate/fsdp2.yaml, or --fsdp_config)."""
    launched = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and \
        os.environ.get("FSDP_ACTIVATION_CHECKPOINTING", "false").lower() in ("true", "1")
    flagged = bool(training_args.fsdp) and str(training_args.fsdp_config.get("activation_checkpointing")).lower() == "true"
    return launched or flagged


def main(argv: list[str] | None = None) -> None:
    model_args, data_args, patch_args, training_args = parse_arguments(argv)
    setup_logging(training_args)
    if training_args.include_num_input_tokens_seen == "no":
        training_args.include_num_input_tokens_seen = "non_padding"  # real-token counts for the efficiency figures
    training_args.remove_unused_columns = False  # our examples hold exactly what the collators read ("lengths" too)
    resume = resolve_resume(training_args)
    if training_args.gradient_checkpointing and fsdp_checkpoints_activations(training_args):
        training_args.gradient_checkpointing = False  # FSDP checkpoints each decoder layer; transformers refuses both
        logger.info("--gradient_checkpointing off: the FSDP config's activation checkpointing replaces it")

    tokenizer = load_tokenizer(model_args.model_name_or_path, model_args.tokenizer_name_or_path)
    train_dataset, collator, context = build_training_data(data_args, tokenizer)

    overrides = {"num_hidden_layers": model_args.num_hidden_layers} if model_args.num_hidden_layers else {}
    model = load_model(model_args.model_name_or_path, dtype=getattr(torch, model_args.model_dtype),
                       seed=training_args.seed, config_overrides=overrides)
    apply_patches(model, moe_kernel=patch_args.moe_kernel, liger=patch_args.liger,
                  attn_implementation=model_args.attn_implementation, fp8=patch_args.fp8,
                  fp8_recipe=patch_args.fp8_recipe, device=training_args.device)

    trainer = SFTTrainer(model=model, args=training_args, train_dataset=train_dataset, data_collator=collator,
                         processing_class=tokenizer)
    peak = patch_args.peak_tflops or detect_peak_tflops()
    add_efficiency_callback(trainer, EfficiencyCallback(flops_per_token(model.config, context), peak))
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(training_args.output_dir)
    logger.info("saved the final model and tokenizer to %s", training_args.output_dir)


if __name__ == "__main__":
    try:
        main()
    except (DataError, FileNotFoundError) as error:  # bad input: the message says what to fix; bugs keep tracebacks
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)

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
import sys

import torch

if not torch.cuda.is_available():
    # torchao's wheel links its C++ parts against CUDA; on a CPU they fail to load noisily (its Python API still works).
    os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")

import transformers  # noqa: E402
from transformers.integrations import is_deepspeed_zero3_enabled  # noqa: E402

from monkey_patch import apply_patches, resolve_compile_layers, resolve_moe_kernel  # noqa: E402
from monkey_patch.errors import PatchError  # noqa: E402
from monkey_patch.kept_experts import check_kept_experts  # noqa: E402
from sft.arguments import parse_arguments  # noqa: E402
from sft.callbacks import EfficiencyCallback, ProfilerCallback, add_efficiency_callback  # noqa: E402
from sft.collate import PackedCollator, PaddedCollator, mean_causal_context, pack_examples  # noqa: E402
from sft.data import DataError, load_conversations  # noqa: E402
from sft.metrics import detect_peak_tflops, flops_per_token  # noqa: E402
from sft.model import fsdp_rank_zero_loading, load_model, load_tokenizer  # noqa: E402
from sft.render import tokenize_conversations  # noqa: E402
from sft.trainer import (SFTTrainer, fused_adamw_setup, prepare_training_args, resolve_adamw_kernel,  # noqa: E402
                         resolve_resume, sharding_backend)

logger = logging.getLogger("train")


def setup_logging(training_args) -> None:
    """Our loggers at INFO on the main process (data counts, patch choices, efficiency); transformers at its own."""
    level = logging.INFO if training_args.should_log else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level, stream=sys.stdout)
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())


def build_training_data(data_args, tokenizer, pad_to_multiple_of: int | None = None):
    """(train dataset, collator, mean causal attention context per token) for the Trainer."""
    conversations = load_conversations(data_args.dataset, data_args.data_format, data_args.dataset_split,
                                       data_args.skip_bad_rows)
    tokenized = tokenize_conversations(tokenizer, conversations.messages, data_args.max_seq_length,
                                       data_args.assistant_only_loss)
    context = mean_causal_context(tokenized.examples)
    if data_args.packing:
        collator = PackedCollator(tokenizer.pad_token_id, pad_to_multiple_of)
        return pack_examples(tokenized.examples, data_args.max_seq_length), collator, context
    return tokenized.examples, PaddedCollator(tokenizer.pad_token_id, pad_to_multiple_of), context


def main(argv: list[str] | None = None) -> None:
    model_args, data_args, patch_args, training_args = parse_arguments(argv)
    setup_logging(training_args)
    prepare_training_args(training_args)
    resume = resolve_resume(training_args)

    sharding = sharding_backend(training_args)
    if patch_args.recompute_experts == "false":  # before minutes of model loading; apply_patches checks the same
        check_kept_experts(resolve_moe_kernel(patch_args.moe_kernel),
                           resolve_compile_layers(patch_args.compile_layers, patch_args.fp8, sharding))
    ours_adamw = resolve_adamw_kernel(patch_args.adamw_kernel, training_args, sharding)
    logger.info("optimizer: %s", "FusedAdamW, gradient clipping folded in (sft/adamw.py)" if ours_adamw
                else f"the Trainer's --optim {getattr(training_args.optim, 'value', training_args.optim)}")
    tokenizer = load_tokenizer(model_args.model_name_or_path, model_args.tokenizer_name_or_path)
    # FP8 GEMMs need token counts divisible by 16 (a packed row of 8187 tokens fails in torchao's backward).
    train_dataset, collator, context = build_training_data(data_args, tokenizer, 16 if patch_args.fp8 else None)

    overrides = {"num_hidden_layers": model_args.num_hidden_layers} if model_args.num_hidden_layers else {}
    # A preset's random weights are drawn on the GPU it trains on; under ZeRO-3, zero.Init places each partition.
    on_gpu = training_args.device.type == "cuda" and not is_deepspeed_zero3_enabled()
    model = load_model(model_args.model_name_or_path, dtype=getattr(torch, model_args.model_dtype),
                       seed=training_args.seed, config_overrides=overrides,
                       init_device=training_args.device if on_gpu else None,
                       upcast_by_accelerate=training_args.bf16 or training_args.fp16)
    if fsdp_rank_zero_loading():
        # Rank 0's weights only feed accelerate's broadcast, and accelerate keeps a full fp32 copy of them while it
        # shards: on the GPU that is 114 GiB for Qwen3-30B-A3B beside the shards. On the CPU (where from_pretrained
        # leaves a checkpoint's weights in this case too; other ranks hold CPU placeholders) the GPU holds only shards.
        model.to("cpu")
    logger.info("model %s: %s parameters on %s", model_args.model_name_or_path,
                f"{sum(p.numel() for p in model.parameters()):,}", next(model.parameters()).device)
    recompute_experts, checkpoint_kwargs = patch_args.recompute_experts, training_args.gradient_checkpointing_kwargs or {}
    if recompute_experts == "auto" and (checkpoint_kwargs.get("use_reentrant") or "context_fn" in checkpoint_kwargs):
        recompute_experts = "true"  # keeping needs torch's non-reentrant checkpoint without a context_fn of its own
    apply_patches(model, moe_kernel=patch_args.moe_kernel, liger=patch_args.liger,
                  attn_implementation=model_args.attn_implementation, fp8=patch_args.fp8,
                  fp8_recipe=patch_args.fp8_recipe, fp8_experts=patch_args.fp8_experts,
                  compile_layers=patch_args.compile_layers, device=training_args.device,
                  sharding=sharding, ce_chunk_tokens=patch_args.ce_chunk_tokens,
                  recompute_experts=recompute_experts,
                  tokens_per_micro_batch=data_args.max_seq_length * training_args.per_device_train_batch_size)

    trainer = SFTTrainer(model=model, args=training_args, train_dataset=train_dataset, data_collator=collator,
                         processing_class=tokenizer,
                         optimizer_cls_and_kwargs=fused_adamw_setup(training_args) if ours_adamw else None)
    peak = patch_args.peak_tflops or detect_peak_tflops()
    add_efficiency_callback(trainer, EfficiencyCallback(flops_per_token(model.config, context), peak))
    if patch_args.profile_steps > 0:
        trainer.add_callback(ProfilerCallback(patch_args.profile_steps, patch_args.profile_warmup_steps))
    trainer.train(resume_from_checkpoint=resume)
    if model_args.save_final_model:
        trainer.save_model(training_args.output_dir)
        logger.info("saved the final model and tokenizer to %s", training_args.output_dir)
    if torch.distributed.is_initialized():
        # Every rank leaves together, with its process group torn down: a rank that exited while rank 0 was still
        # writing the final model, its gloo threads alive, aborted at exit ("terminate called without an active
        # exception"; a 2-process FSDP run on the CPU, once in three runs).
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except (DataError, FileNotFoundError, PatchError) as error:  # bad input: the message says what to fix; bugs keep tracebacks
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)

"""The Hugging Face Trainer around our runs: argument fix-ups, which checkpoint to resume, a resume that restores
MoE expert weights, and which AdamW runs (ours, sft/adamw.py, with the clipping folded in, or the Trainer's).

transformers 5.17's `Trainer._load_from_checkpoint` reads model.safetensors into `load_state_dict(strict=False)`.
Checkpoints hold the stock per-expert layout (`experts.N.gate_proj.weight`, what `save_pretrained` writes), while the
live model has fused parameters (`experts.gate_up_proj`): the keys do not match, so the experts silently kept their
pre-resume values (seen on the tiny preset: "missing keys ... experts.gate_up_proj" and a loss 0.012 off the
uninterrupted run at the first resumed step). We load the checkpoint through `from_pretrained`, whose weight
converters fuse the experts, and copy it in strictly. FSDP and DeepSpeed checkpoints keep their own loaders.

The final model is one consolidated stock-layout checkpoint under every backend. Under FSDP with SHARDED_STATE_DICT
(config/accelerate/fsdp2.yaml) transformers 5.17's `save_model` writes nothing at all (it only handles
FULL_STATE_DICT), so `save_model` gathers the full state dict for the final save; intermediate checkpoints
(`_internal_call`) stay sharded. ZeRO-3 needs nothing here: stage3_gather_16bit_weights_on_model_save does it.
"""
from __future__ import annotations

import logging
import os
import re
import zipfile

import torch
from transformers import AutoModelForCausalLM, Trainer

from monkey_patch.errors import PatchError
from sft.adamw import FusedAdamW, clip_grad_norm

logger = logging.getLogger(__name__)


def prepare_training_args(training_args) -> None:
    """The TrainingArguments our pipeline relies on, set in place."""
    if training_args.include_num_input_tokens_seen == "no":
        training_args.include_num_input_tokens_seen = "non_padding"  # real-token counts for the efficiency figures
    training_args.remove_unused_columns = False  # our examples hold exactly what the collators read ("lengths" too)
    if training_args.dataloader_pin_memory and not training_args.accelerator_config.non_blocking:
        # accelerate copies each batch to the GPU when the Trainer asks for it, after the previous step's optimizer
        # was queued; a blocking copy waits for that queue to drain, so every forward would start with the GPU idle
        # and the host launching its first kernels one by one. Pinned batches copy asynchronously instead.
        training_args.accelerator_config.non_blocking = True
    if training_args.gradient_checkpointing and fsdp_checkpoints_activations(training_args):
        training_args.gradient_checkpointing = False  # FSDP checkpoints each decoder layer; transformers refuses both
        logger.info("--gradient_checkpointing off: the FSDP config's activation checkpointing replaces it")


def checkpoint_is_complete(path: str, world_size: int = 1) -> bool:
    """trainer_state.json and every rank's RNG state, whole.

    Rank 0 writes trainer_state.json last of its own files, but the other ranks write their rng_state_<rank>.pth at
    the same time: a ZeRO-3 run killed by SIGTERM right after a save left trainer_state.json beside a truncated
    rng_state_1.pth, and the resume died in torch.load (EOFError). torch.save writes zip archives, so a truncated
    one fails the zip check without unpickling anything.
    """
    if not os.path.isfile(os.path.join(path, "trainer_state.json")):
        return False
    names = ["rng_state.pth"] if world_size <= 1 else [f"rng_state_{rank}.pth" for rank in range(world_size)]
    for name in names:
        file = os.path.join(path, name)
        if not zipfile.is_zipfile(file):
            return False
        with zipfile.ZipFile(file) as archive:
            if archive.testzip() is not None:
                return False
    return True


def latest_checkpoint(output_dir: str, world_size: int = 1) -> str | None:
    """The newest checkpoint-N of output_dir that is complete (see checkpoint_is_complete): a run killed while saving
    leaves a newer, partial folder, which is skipped."""
    steps = [int(m.group(1)) for name in (os.listdir(output_dir) if os.path.isdir(output_dir) else [])
             if (m := re.fullmatch(r"checkpoint-(\d+)", name))
             and checkpoint_is_complete(os.path.join(output_dir, name), world_size)]
    return os.path.join(output_dir, f"checkpoint-{max(steps)}") if steps else None


def resolve_resume(training_args) -> str | None:
    """`--resume_from_checkpoint latest` (or true) resumes from the newest complete checkpoint-N in output_dir."""
    requested = training_args.resume_from_checkpoint
    if requested in (None, "", "false", "False"):
        return None
    if requested in ("latest", "true", "True"):
        last = latest_checkpoint(training_args.output_dir, training_args.world_size)
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


def sharding_backend(training_args) -> str | None:
    """"fsdp" or "deepspeed" when the run shards the model (accelerate's launch config or the Trainer's flags)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" or training_args.fsdp:
        return "fsdp"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" or training_args.deepspeed:
        return "deepspeed"
    return None


TORCH_ADAMW = ("adamw_torch", "adamw_torch_fused")


def resolve_adamw_kernel(requested: str, training_args, sharding: str | None) -> bool:
    """Whether the run uses our FusedAdamW (see the --adamw_kernel help); `ours` where it cannot run raises."""
    if requested not in ("auto", "ours", "torch"):
        raise PatchError(f"--adamw_kernel {requested!r}: choose auto, ours or torch")
    optim = getattr(training_args.optim, "value", training_args.optim)  # an OptimizerNames member or its string
    problems = [why for why, applies in (
        (f"{sharding} shards the parameters", bool(sharding)),
        ("fp16 needs the Trainer's loss-scale unscaling before clipping", training_args.fp16),
        ("it is a CUDA kernel", training_args.device.type != "cuda"),
        (f"--optim {optim} is not torch's AdamW", optim not in TORCH_ADAMW)) if applies]
    if requested == "ours" and problems:
        raise PatchError(f"--adamw_kernel ours cannot run here ({'; '.join(problems)}): use --adamw_kernel auto or "
                         "torch")
    return requested == "ours" or (requested == "auto" and not problems)


def fused_adamw_setup(training_args) -> tuple[type, dict]:
    """Trainer(optimizer_cls_and_kwargs=...) for FusedAdamW, with the hyperparameters the Trainer gives its AdamW (it
    still groups the parameters and sets weight decay per group)."""
    return FusedAdamW, {"lr": training_args.learning_rate, "betas": (training_args.adam_beta1, training_args.adam_beta2),
                        "eps": training_args.adam_epsilon}


class SFTTrainer(Trainer):
    def _clip_grad_norm(self, model):
        """With FusedAdamW the clipping coefficient goes to the optimizer's next step (sft/adamw.py)."""
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate wraps it
        if isinstance(optimizer, FusedAdamW):
            return clip_grad_norm(list(model.parameters()), self.args.max_grad_norm, optimizer)
        return super()._clip_grad_norm(model)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        fsdp_plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
        if _internal_call or not self.is_fsdp_enabled or "FULL_STATE_DICT" in str(fsdp_plugin.state_dict_type):
            return super().save_model(output_dir, _internal_call)
        state_dict = self.accelerator.get_state_dict(self.model)
        if self.args.should_save:
            self._save(output_dir or self.args.output_dir, state_dict=state_dict)  # per-expert keys, like save_pretrained

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        model = model if model is not None else self.model
        dtype = next(model.parameters()).dtype
        saved = AutoModelForCausalLM.from_pretrained(resume_from_checkpoint, dtype=dtype, device_map="cpu")
        model.load_state_dict(saved.state_dict(), strict=True)
        logger.info("loaded model weights from %s", resume_from_checkpoint)

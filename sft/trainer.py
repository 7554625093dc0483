"""The Hugging Face Trainer, with a resume that restores MoE expert weights.

transformers 5.17's `Trainer._load_from_checkpoint` reads model.safetensors into `load_state_dict(strict=False)`.
Checkpoints hold the stock per-expert layout (`experts.N.gate_proj.weight`, what `save_pretrained` writes), while the
live model has fused parameters (`experts.gate_up_proj`): the keys do not match, so the experts silently kept their
pre-resume values (seen on the tiny preset: "missing keys ... experts.gate_up_proj" and a loss 0.012 off the
uninterrupted run at the first resumed step). We load the checkpoint through `from_pretrained`, whose weight
converters fuse the experts, and copy it in strictly. FSDP and DeepSpeed checkpoints keep their own loaders.
"""
from __future__ import annotations

import logging

import torch
from transformers import AutoModelForCausalLM, Trainer

logger = logging.getLogger(__name__)


class SFTTrainer(Trainer):
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        model = model if model is not None else self.model
        dtype = next(model.parameters()).dtype
        saved = AutoModelForCausalLM.from_pretrained(resume_from_checkpoint, dtype=dtype, device_map="cpu")
        model.load_state_dict(saved.state_dict(), strict=True)
        logger.info("loaded model weights from %s", resume_from_checkpoint)

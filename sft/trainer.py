"""The Hugging Face Trainer, with a resume that restores MoE expert weights.

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

import torch
from transformers import AutoModelForCausalLM, Trainer

logger = logging.getLogger(__name__)


class SFTTrainer(Trainer):
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

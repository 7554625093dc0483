"""Trainer callbacks: the efficiency figures of sft/metrics.py at every logging step and at the end of the run."""
from __future__ import annotations

import json
import logging
import os

from transformers import Trainer, TrainerCallback

from sft.metrics import EfficiencyMeter

logger = logging.getLogger(__name__)


class EfficiencyCallback(TrainerCallback):
    def __init__(self, flops_per_token: float, peak_tflops: float | None):
        self.flops_per_token = flops_per_token
        self.peak_tflops = peak_tflops
        self.meter: EfficiencyMeter | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        output_dir = args.output_dir if state.is_world_process_zero else None
        self.meter = EfficiencyMeter(self.flops_per_token, args.world_size, self.peak_tflops, output_dir)
        self.meter.start(state.global_step, state.num_input_tokens_seen)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.meter is not None and logs is not None and "loss" in logs:
            logs.update(self.meter.measure(state.global_step, state.num_input_tokens_seen, logs))

    def on_train_end(self, args, state, control, **kwargs):
        if self.meter is None or not state.is_world_process_zero:
            return
        summary = self.meter.summary()
        logger.info("efficiency summary: %s", json.dumps(summary))
        with open(os.path.join(args.output_dir, "efficiency_summary.json"), "w") as file:
            json.dump(summary, file, indent=1)


def add_efficiency_callback(trainer: Trainer, callback: EfficiencyCallback) -> None:
    """Put the callback first, so the reporting integrations (tensorboard, wandb...) that run after it see its figures
    in the same `logs` dict; Trainer's own `callbacks=` argument would append it after them."""
    trainer.callback_handler.callbacks.insert(0, callback)

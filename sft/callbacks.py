"""Trainer callbacks: the efficiency figures of sft/metrics.py at every logging step and at the end of the run, and
the optional torch.profiler window of sft/profiling.py (`--profile_steps`)."""
from __future__ import annotations

import json
import logging
import os
import time

import torch
from transformers import Trainer, TrainerCallback

from sft.metrics import EfficiencyMeter
from sft.profiling import profiler_activities, summarize

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


class ProfilerCallback(TrainerCallback):
    """torch.profiler over `steps` optimizer steps after `warmup_steps`; each rank writes output_dir/profile_rank<R>.md.

    The Trainer fetches a step's batches before `on_step_begin`, so the window runs from the end of the last warm-up
    step to the end of the last profiled one: whole loop iterations, each with its batch fetch and the previous step's
    logging (and saving, if a checkpoint falls inside). With no warm-up it opens at the first `on_step_begin`.
    """

    def __init__(self, steps: int, warmup_steps: int):
        self.steps, self.warmup_steps = steps, warmup_steps
        self.first_step = self.start_step = 0
        self.profiler: torch.profiler.profile | None = None
        self.start_time = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.first_step = state.global_step  # a resumed run warms up again before its window

    def on_step_begin(self, args, state, control, **kwargs):
        if self.warmup_steps == 0 and state.global_step == self.first_step and self.profiler is None:
            self.start(state)

    def on_step_end(self, args, state, control, **kwargs):
        if self.profiler is None and state.global_step - self.first_step == self.warmup_steps:
            self.start(state)
        elif self.profiler is not None and state.global_step - self.start_step >= self.steps:
            self.finish(args, state)

    def on_train_end(self, args, state, control, **kwargs):
        if self.profiler is not None:  # training ended inside the window: report the steps it holds
            self.finish(args, state)
        elif state.global_step - self.first_step < self.warmup_steps and state.is_world_process_zero:
            logger.warning("--profile_steps: nothing profiled; training ended after %d steps, within the %d warm-up "
                           "steps (--profile_warmup_steps)", state.global_step - self.first_step, self.warmup_steps)

    def start(self, state) -> None:
        self.profiler = torch.profiler.profile(activities=profiler_activities(torch.cuda.is_available()))
        self.profiler.start()
        synchronize()  # the wall starts with no kernel of the warm-up still running
        self.start_step, self.start_time = state.global_step, time.perf_counter()

    def finish(self, args, state) -> None:
        synchronize()  # and ends when the last profiled kernel has finished
        wall = time.perf_counter() - self.start_time
        self.profiler.stop()
        steps, profiler, self.profiler = state.global_step - self.start_step, self.profiler, None
        if steps == 0:
            if state.is_world_process_zero:
                logger.warning("--profile_steps: nothing profiled; training ended right after the warm-up steps")
            return
        rank, world_size = distributed_rank_and_size()
        breakdown = summarize(profiler.key_averages(), steps, wall)
        path = os.path.join(args.output_dir, f"profile_rank{rank}.md")
        os.makedirs(args.output_dir, exist_ok=True)
        with open(path, "w") as file:
            file.write(f"Profile of steps {self.start_step + 1}-{state.global_step} ({steps} steps profiled), rank "
                       f"{rank}, world size {world_size}\n\n{breakdown.markdown()}\n")
        if state.is_world_process_zero:
            logger.info("profile of steps %d-%d, rank 0: %s; %s", self.start_step + 1, state.global_step,
                        breakdown.summary_line(), path)


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def distributed_rank_and_size() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def add_efficiency_callback(trainer: Trainer, callback: EfficiencyCallback) -> None:
    """Put the callback first, so the reporting integrations (tensorboard, wandb...) that run after it see its figures
    in the same `logs` dict; Trainer's own `callbacks=` argument would append it after them."""
    trainer.callback_handler.callbacks.insert(0, callback)

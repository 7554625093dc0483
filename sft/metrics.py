"""Efficiency monitoring: seconds/step, real tokens/s (per GPU too), MFU and peak memory at every logging step.

Figures go into the Trainer's logs (so --report_to tensorboard/wandb/... see them), into <output_dir>/metrics.jsonl (one
JSON object per logging step), and into an end-of-run summary (<output_dir>/efficiency_summary.json and the log).

MFU = achieved model FLOP/s per device / peak dense bf16 FLOP/s of the device, with model FLOPs per trained token
  6 * (active matmul parameters)                      forward + backward (2 + 4) of every weight a token goes through:
                                                      attention projections, router, the top-k experts' three
                                                      matrices, dense MLPs if any, lm_head (not the embedding lookup)
  + 12 * layers * q_heads * head_dim * context        QK^T and AV, forward + backward, where context is the mean number
                                                      of keys a token attends to (causal, within its own document)
Activation recomputation (gradient checkpointing) is not counted: MFU measures useful work. Real tokens exclude padding.
"""
from __future__ import annotations

import json
import logging
import os
import resource
import time

import torch

from monkey_patch import is_moe_layer

logger = logging.getLogger(__name__)

# Datasheet dense (no sparsity) bf16 tensor-core peaks, TFLOP/s; the first substring that occurs in the device name wins.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("H800", 989.4), ("H20", 148.0),
                    ("GB200", 2500.0), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0))


def detect_peak_tflops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops
    logger.warning("unknown peak bf16 TFLOP/s for %r: MFU is not reported; pass --peak_tflops", name)
    return None


def active_matmul_params(config) -> int:
    """Weights one token multiplies with in a forward pass (Qwen3-MoE: every layer sparse unless listed dense)."""
    hidden, head_dim = config.hidden_size, config.head_dim
    attention = hidden * head_dim * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
    per_layer = []
    for layer in range(config.num_hidden_layers):
        mlp = (hidden * config.num_experts + config.num_experts_per_tok * 3 * hidden * config.moe_intermediate_size
               if is_moe_layer(config, layer) else 3 * hidden * config.intermediate_size)
        per_layer.append(attention + mlp)
    return sum(per_layer) + hidden * config.vocab_size


def flops_per_token(config, mean_context: float) -> float:
    attention = 12 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * mean_context
    return 6 * active_matmul_params(config) + attention


def peak_memory_gib() -> float:
    """Peak GPU memory allocated by this process, or on a CPU the process's peak resident memory."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


class EfficiencyMeter:
    """Turns the Trainer's step and token counters into efficiency figures between two logging steps."""

    def __init__(self, flops_per_token: float, world_size: int, peak_tflops: float | None, output_dir: str | None):
        self.flops_per_token = flops_per_token
        self.world_size = world_size
        self.peak_tflops = peak_tflops
        self.path = os.path.join(output_dir, "metrics.jsonl") if output_dir else None
        self.records: list[dict] = []
        self._intervals: list[tuple[int, float, int]] = []  # (steps, seconds, tokens) per record, for the summary
        self._last = None  # (time, step, tokens) at the previous logging step

    def start(self, step: int, tokens: int) -> None:
        """Begin measuring at `step` (0, or the step a resumed run starts from)."""
        self._last = (time.perf_counter(), step, tokens)
        if self.path and os.path.exists(self.path):
            # A new run starts the file afresh; a resumed one keeps the records up to its checkpoint and drops
            # those the interrupted run logged after it, which this run logs again.
            with open(self.path) as file:
                kept = [line for line in file if line.strip() and json.loads(line)["step"] <= step]
            with open(self.path, "w") as file:
                file.writelines(kept)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def measure(self, step: int, tokens: int, logs: dict) -> dict:
        """Figures since the previous call; appends the record (logs + figures) to metrics.jsonl."""
        now = time.perf_counter()
        last_time, last_step, last_tokens = self._last
        self._last = (now, step, tokens)
        steps, seconds, new_tokens = step - last_step, now - last_time, tokens - last_tokens
        if steps <= 0 or seconds <= 0:
            return {}
        tokens_per_sec = new_tokens / seconds
        per_gpu = tokens_per_sec / self.world_size
        achieved_tflops = per_gpu * self.flops_per_token / 1e12
        figures = {
            "sec_per_step": round(seconds / steps, 4),
            "tokens_per_sec": round(tokens_per_sec, 1),
            "tokens_per_sec_per_gpu": round(per_gpu, 1),
            "tflops_per_gpu": round(achieved_tflops, 2),
            "mfu": round(achieved_tflops / self.peak_tflops, 4) if self.peak_tflops else None,
            "peak_mem_gib": round(peak_memory_gib(), 2),
        }
        record = {"step": step, **{k: v for k, v in logs.items() if isinstance(v, (int, float))}, **figures}
        self.records.append(record)
        self._intervals.append((steps, seconds, new_tokens))
        if self.path:
            with open(self.path, "a") as file:
                file.write(json.dumps(record) + "\n")
        return figures

    def summary(self) -> dict:
        """Run totals over the steady intervals: the first logging interval (compilation, autotuning, allocator
        warm-up) is left out if others exist. Rates are totals over totals (tokens / seconds), not a mean of the
        intervals' rates, which one slow interval would bias upwards."""
        steady = slice(1, None) if len(self.records) > 1 else slice(None)
        records, intervals = self.records[steady], self._intervals[steady]
        if not records:
            return {}
        steps, seconds, tokens = (sum(column) for column in zip(*intervals))
        per_gpu = tokens / seconds / self.world_size
        mfu = per_gpu * self.flops_per_token / 1e12 / self.peak_tflops if self.peak_tflops else None
        return {
            "logging_intervals": len(records),
            "sec_per_step": round(seconds / steps, 4),
            "tokens_per_sec": round(tokens / seconds, 1),
            "tokens_per_sec_per_gpu": round(per_gpu, 1),
            "mfu": round(mfu, 4) if mfu is not None else None,
            "peak_mem_gib": max(r["peak_mem_gib"] for r in self.records),
            "first_loss": self.records[0].get("loss"),
            "last_loss": self.records[-1].get("loss"),
            "peak_tflops": self.peak_tflops,
            "flops_per_token": self.flops_per_token,
        }

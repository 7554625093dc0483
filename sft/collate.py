"""Batches: padded, or packed and padding-free.

Packed: examples are packed into rows of at most `max_seq_length` tokens (best-fit decreasing), and a micro-batch of
rows is sent as ONE flattened row `input_ids [1, N]` whose `position_ids` restart at 0 at every document. No document
attends to another and no padding token is ever computed. The batch also carries the document boundaries the way
transformers' DataCollatorWithFlattening hands them to varlen attention kernels (`cu_seq_lens_q/k`, `max_length_q/k`),
computed here on the host: derived on the GPU from the restarts, the longest document's length is a host sync in
every forward (monkey_patch/packed_attention.py reads these when present). The first label of every document is
masked: in a flattened row it would otherwise be predicted from the previous document's last token (alone, a
document's first token is never a target either).
"""
from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass

import torch

from sft.render import IGNORE_INDEX

logger = logging.getLogger(__name__)


def pack_examples(examples: list[dict], max_seq_length: int) -> list[dict]:
    """Best-fit-decreasing bin packing of examples into rows {"input_ids", "labels", "lengths"}.

    Deterministic; O(n log n): the open rows are kept sorted by free space and each example goes to the fullest row
    that still fits it.
    """
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    free: list[tuple[int, int]] = []  # sorted (free slots, row id)
    rows: list[list[int]] = []
    for i in order:
        length = len(examples[i]["input_ids"])
        if length > max_seq_length:
            raise ValueError(f"example of {length} tokens exceeds max_seq_length={max_seq_length}; truncate first")
        at = bisect.bisect_left(free, (length, -1))
        if at < len(free):
            space, row = free.pop(at)
        else:
            space, row = max_seq_length, len(rows)
            rows.append([])
        rows[row].append(i)
        bisect.insort(free, (space - length, row))
    packed = []
    for members in rows:
        packed.append({
            "input_ids": [t for i in members for t in examples[i]["input_ids"]],
            "labels": [t for i in members for t in examples[i]["labels"]],
            "lengths": [len(examples[i]["input_ids"]) for i in members],
        })
    real = sum(len(e["input_ids"]) for e in examples)
    logger.info("packed %d examples into %d rows of %d slots: packing efficiency %.1f%% (real tokens / slots)",
                len(examples), len(packed), max_seq_length, 100.0 * real / max(1, len(packed) * max_seq_length))
    return packed


@dataclass
class PackedCollator:
    """Rows from `pack_examples` -> one flattened, padding-free row with per-document position_ids.

    `pad_to_multiple_of` (FP8 GEMMs need token counts divisible by 16) appends one padding document of
    `pad_token_id`s, never a target, that attends only to itself.
    """
    pad_token_id: int = 0
    pad_to_multiple_of: int | None = None

    def __call__(self, rows: list[dict]) -> dict:
        input_ids, labels, positions, lengths = [], [], [], []
        for row in rows:
            input_ids += row["input_ids"]
            start = 0
            for length in row["lengths"]:
                labels += [IGNORE_INDEX] + row["labels"][start + 1:start + length]
                positions += range(length)
                start += length
            lengths += row["lengths"]
        pad = -len(input_ids) % self.pad_to_multiple_of if self.pad_to_multiple_of else 0
        input_ids += [self.pad_token_id] * pad
        labels += [IGNORE_INDEX] * pad
        positions += range(pad)
        lengths += [pad] if pad else []
        cu_seq_lens = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        longest = max(lengths)
        return {"input_ids": torch.tensor([input_ids]), "labels": torch.tensor([labels]),
                "position_ids": torch.tensor([positions]),
                "cu_seq_lens_q": cu_seq_lens, "cu_seq_lens_k": cu_seq_lens,
                "max_length_q": longest, "max_length_k": longest}


@dataclass
class PaddedCollator:
    """Examples -> right-padded [B, L] batch with an attention mask; padding is never a target."""
    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(e["input_ids"]) for e in examples)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {"input_ids": [], "labels": [], "attention_mask": []}
        for e in examples:
            pad = longest - len(e["input_ids"])
            batch["input_ids"].append(e["input_ids"] + [self.pad_token_id] * pad)
            batch["labels"].append(e["labels"] + [IGNORE_INDEX] * pad)
            batch["attention_mask"].append([1] * len(e["input_ids"]) + [0] * pad)
        return {key: torch.tensor(value) for key, value in batch.items()}


def mean_causal_context(examples: list[dict]) -> float:
    """Keys a token attends to, averaged over the data set's tokens: sum(L^2 / 2) / sum(L) under a causal mask.

    Documents attend only within themselves (packed or not), so this, not max_seq_length, sets attention FLOPs.
    """
    lengths = [len(e["input_ids"]) for e in examples]
    return sum(n * n / 2 for n in lengths) / max(1, sum(lengths))

"""Chat messages -> token ids and labels, through the tokenizer's own chat template.

The Qwen3 template has no `{% generation %}` markers (transformers' `return_assistant_tokens_mask` gives zeros), and it
renders earlier assistant turns differently from the last one (it strips their <think> blocks), so rendering turn by
turn and concatenating would not reproduce what the model sees at inference. We render the whole conversation once
and find the assistant turns in the rendered text: a token is trained when its characters overlap an assistant turn,
from the first character after the `<|im_start|>assistant\\n` header through its `<|im_end|>` end-of-turn token,
thinking tags included as the template emits them.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import numpy as np
from transformers import PreTrainedTokenizerBase

from sft.data import DataError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value that transformers' causal-LM loss skips


@dataclass
class TokenizedSet:
    examples: list[dict]  # {"input_ids": list[int], "labels": list[int]}
    truncated: int = 0  # examples cut to max_seq_length (kept)
    dropped: int = 0  # examples left with no trained token (removed)


def assistant_spans(text: str, header: str, end_of_turn: str) -> list[tuple[int, int]]:
    """Character spans [start, end) of each assistant turn's content and its end-of-turn marker."""
    pattern = re.compile(re.escape(header) + r"(.*?)" + re.escape(end_of_turn), re.DOTALL)
    return [(m.start(1), m.end()) for m in pattern.finditer(text)]


def render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], assistant_only_loss: bool = True,
           header: str = "<|im_start|>assistant\n", end_of_turn: str = "<|im_end|>") -> dict:
    """One conversation as {"input_ids", "labels"}; labels are IGNORE_INDEX outside assistant turns."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = encoded["input_ids"]
    if not assistant_only_loss:
        return {"input_ids": input_ids, "labels": list(input_ids)}
    spans = assistant_spans(text, header, end_of_turn)
    if not spans:
        raise DataError(f"the chat template's output has no {header!r} ... {end_of_turn!r} turn, so the assistant "
                        "turns cannot be found; for a tokenizer with other chat markers pass --assistant_only_loss false")
    # Token i is trained when [start_i, end_i) overlaps a span: the first span ending after start_i begins before end_i.
    offsets = np.asarray(encoded["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    span_starts, span_ends = np.asarray(spans, dtype=np.int64).T
    first = np.searchsorted(span_ends, offsets[:, 0], side="right")
    inside = first < len(spans)
    inside[inside] = span_starts[first[inside]] < offsets[inside, 1]
    labels = np.where(inside, np.asarray(input_ids), IGNORE_INDEX).tolist()
    return {"input_ids": input_ids, "labels": labels}


def tokenize_conversations(tokenizer: PreTrainedTokenizerBase, conversations: list[list[dict]], max_seq_length: int,
                           assistant_only_loss: bool = True) -> TokenizedSet:
    """Render, mask and truncate every conversation; counts what was truncated or dropped and logs it."""
    result = TokenizedSet(examples=[])
    for messages in conversations:
        example = render(tokenizer, messages, assistant_only_loss)
        if len(example["input_ids"]) > max_seq_length:
            result.truncated += 1
            example = {key: ids[:max_seq_length] for key, ids in example.items()}
        # A label only counts if a previous token predicts it: the first token is never a target.
        if all(label == IGNORE_INDEX for label in example["labels"][1:]):
            result.dropped += 1
            continue
        result.examples.append(example)
    logger.info("tokenized %d conversations: %d truncated to max_seq_length=%d, %d dropped (no trained token left)",
                len(conversations), result.truncated, max_seq_length, result.dropped)
    if not result.examples:
        raise DataError(f"all {len(conversations)} examples were dropped: none has a trained token within "
                         f"max_seq_length={max_seq_length}; raise --max_seq_length")
    return result

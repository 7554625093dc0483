"""Packing: rows are filled without loss, and a packed batch computes exactly what each document computes alone."""
import random

import pytest
import torch

from sft.collate import PackedCollator, PaddedCollator, mean_causal_context, pack_examples
from sft.model import load_model
from sft.render import IGNORE_INDEX


def examples_of(lengths, seed=0):
    rng = random.Random(seed)
    out = []
    for n in lengths:
        ids = [rng.randrange(1000, 5000) for _ in range(n)]
        out.append({"input_ids": ids, "labels": [t if rng.random() < 0.5 else IGNORE_INDEX for t in ids]})
    return out


def test_pack_examples_keeps_every_token_and_respects_capacity():
    rng = random.Random(1)
    lengths = [min(512, int(rng.paretovariate(1.2) * 20)) for _ in range(500)]  # long-tailed mix
    examples = examples_of(lengths)
    rows = pack_examples(examples, max_seq_length=512)
    assert all(sum(r["lengths"]) == len(r["input_ids"]) <= 512 for r in rows)
    packed = sorted(tuple(r["input_ids"][s:s + n]) for r in rows for s, n in zip(
        [sum(r["lengths"][:i]) for i in range(len(r["lengths"]))], r["lengths"]))
    assert packed == sorted(tuple(e["input_ids"]) for e in examples)
    efficiency = sum(lengths) / (len(rows) * 512)
    assert efficiency > 0.95, efficiency  # best-fit decreasing on a long-tailed mix


def test_packed_collator_flattens_and_restarts_positions():
    examples = examples_of([3, 5, 2])
    rows = pack_examples(examples, max_seq_length=8)
    batch = PackedCollator()(rows)
    assert batch["input_ids"].shape == (1, 10)
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert len(starts) == 3
    assert all(batch["labels"][0, s] == IGNORE_INDEX for s in starts)  # no label predicted across documents
    assert batch["cu_seq_lens_q"].tolist() == [0] + starts[1:] + [10] and batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["max_length_q"] == batch["max_length_k"] == 5


def test_padded_collator_masks_padding():
    batch = PaddedCollator(pad_token_id=0)(examples_of([3, 5]))
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1] * 5]
    assert (batch["labels"][0, 3:] == IGNORE_INDEX).all()


def test_mean_causal_context():
    assert mean_causal_context(examples_of([4, 2])) == (16 / 2 + 4 / 2) / 6


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_batch_equals_each_document_alone(attn):
    """transformers detects packed sequences from position_ids restarts (use_cache=False): per-document logits and
    gradients must match running each document alone. fp32 on CPU: differences are summation order only."""
    model = load_model("tiny", dtype=torch.float32, experts_implementation="eager", attn_implementation=attn)
    examples = examples_of([7, 12, 5])
    batch = PackedCollator()(pack_examples(examples, max_seq_length=32))
    packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
    packed.square().mean().backward()
    packed_grad = model.model.embed_tokens.weight.grad.clone()
    model.zero_grad()
    start, total = 0, 0
    for n in (batch["position_ids"][0] == 0).nonzero().flatten().diff(append=torch.tensor([packed.shape[0]])).tolist():
        ids = batch["input_ids"][:, start:start + n]
        alone = model(input_ids=ids).logits[0]
        torch.testing.assert_close(packed[start:start + n], alone, atol=2e-5, rtol=1e-4)
        total = total + alone.square().sum()
        start += n
    (total / packed.numel()).backward()
    torch.testing.assert_close(packed_grad, model.model.embed_tokens.weight.grad, atol=1e-7, rtol=1e-4)


def test_packed_collator_pads_to_a_multiple_with_a_separate_untrained_document():
    batch = PackedCollator(pad_token_id=7, pad_to_multiple_of=16)(pack_examples(examples_of([3, 5, 2]), 16))
    assert batch["input_ids"].shape == (1, 16)
    assert batch["input_ids"][0, 10:].eq(7).all() and batch["labels"][0, 10:].eq(IGNORE_INDEX).all()
    assert batch["position_ids"][0, 10:].tolist() == list(range(6))  # its own document: attends only to itself
    assert batch["cu_seq_lens_q"].tolist() == [0, 5, 8, 10, 16] and batch["max_length_q"] == 6

"""Packed (padding-free) attention: a row of documents must behave exactly like each document run alone.

CPU: transformers' own eager/sdpa detection, our varlen_packed (its per-document sdpa stand-in for the kernel) and
flex_packed (eager flex, forward only: torch has no CPU flex backward), the document layout, the mask wiring, and
choose_attention. GPU (skipped on CPU): the real varlen_attn and compiled flex kernels in bf16.
"""
import os

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, DataCollatorWithFlattening
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, find_packed_sequence_indices
from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import monkey_patch.packed_attention as pa
from sft.model import preset_config

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="varlen_attn and compiled flex_attention run on CUDA only")
DOC_LENS = [5, 1, 9, 3, 12]  # one-token document in second place: a cu_seqlens off-by-one shows up there


def tiny_model(attn, device="cpu", dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(preset_config("tiny", use_cache=False), dtype=dtype,
                                             attn_implementation=attn, experts_implementation="eager")
    return model.to(device)


def packed_batch(lens, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(0, 1000, (1, n), generator=g) for n in lens]
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    return [d.to(device) for d in docs], torch.cat(docs, 1).to(device), pos.to(device)


def logits_and_grads(model, runs):
    """Sum of logits*w over runs (each a dict of model kwargs), w fixed per token: logits and every param grad."""
    model.zero_grad()
    outs = [model(**kw).logits for kw in runs]
    g = torch.Generator().manual_seed(1)
    w = torch.randn(sum(o.shape[1] for o in outs), outs[0].shape[-1], generator=g).to(outs[0])
    torch.cat(outs, 1)[0].mul(w).sum().backward()
    return torch.cat(outs, 1).detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(grads, ref_grads, rel_tol):
    """Error relative to each gradient's norm: elementwise tolerances mislead on near-zero entries."""
    assert grads.keys() == ref_grads.keys()
    for name, ref in ref_grads.items():
        rel = (grads[name].float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)
        assert rel < rel_tol, f"{name}: relative gradient error {rel:.3g}"


# ---- document layout -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("lens", [[7], [5, 1, 9, 3], [1, 4], [4, 1], [1, 1, 1]],
                         ids=["one-doc", "many-docs", "len1-first", "len1-last", "all-len1"])
def test_layout_one_row_matches_transformers(lens):
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    layout = pa.document_layout(pos)
    (cu, _), (max_len, _) = prepare_fa_kwargs_from_position_ids(pos)  # what flash_attention_2 would use
    assert layout.cu_seqlens.tolist() == cu.tolist() == [0, *torch.tensor(lens).cumsum(0).tolist()]
    assert layout.max_seqlen == int(max_len) == max(lens)
    assert layout.plain == (len(lens) == 1) and layout.token_idx is None
    packed = find_packed_sequence_indices(pos)  # what sdpa/eager mask with; None means one document
    assert layout.doc_ids.tolist() == (torch.zeros_like(pos) if packed is None else packed).tolist()


def test_layout_several_rows_and_position_jumps():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5], [0, 0, 1, 2, 7, 8]])  # a jump (2 -> 7) starts a doc
    layout = pa.document_layout(pos)
    assert layout.cu_seqlens.tolist() == [0, 3, 5, 6, 12, 13, 16, 18]
    assert layout.max_seqlen == 6 and not layout.plain
    assert layout.doc_ids.tolist() == [[0, 0, 0, 1, 1, 2], [0] * 6, [0, 1, 1, 1, 2, 2]]
    assert pa.document_layout(torch.arange(6).repeat(3, 1)).plain


@pytest.mark.parametrize("mask,cu,doc_ids", [
    ([[1, 1, 1, 1], [1, 1, 0, 0]], [0, 4, 6], [[0, 0, 0, 0], [0, 0, -1, -1]]),     # right padding
    ([[1, 1, 1, 1], [0, 0, 1, 1]], [0, 4, 6], [[0, 0, 0, 0], [-1, -1, 1, 1]]),     # left padding
    ([[1, 1, 1, 1], [1, 1, 1, 1]], [0, 4, 8], [[0, 0, 0, 0], [0, 0, 0, 0]]),       # a mask without padding
], ids=["right-pad", "left-pad", "no-pad"])
def test_layout_padding(mask, cu, doc_ids):
    mask = torch.tensor(mask)
    layout = pa.document_layout(torch.arange(4)[None], mask)  # [1, S] positions, expanded like transformers does
    assert layout.cu_seqlens.tolist() == cu and layout.doc_ids.tolist() == doc_ids
    assert layout.token_idx.tolist() == mask.reshape(-1).nonzero().squeeze(1).tolist()


# ---- registration and mask wiring ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [pa.VARLEN_PACKED, pa.FLEX_PACKED])
def test_registered_and_no_dense_mask(name, monkeypatch):
    assert name in ALL_ATTENTION_FUNCTIONS.valid_keys() and name in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping
    seen = []
    real = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping[name]
    monkeypatch.setitem(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, name,
                        lambda *a, **kw: seen.append(real(*a, **kw)) or seen[-1])
    model = tiny_model(name).eval()
    _, ids, pos = packed_batch(DOC_LENS)
    with torch.no_grad():
        model(input_ids=ids, position_ids=pos)                              # packed: no mask at all
        model(input_ids=ids[:, :6].repeat(2, 1), attention_mask=torch.ones(2, 6, dtype=torch.long))
        model(input_ids=ids[:, :6].repeat(2, 1), attention_mask=torch.tensor([[1] * 6, [1] * 4 + [0] * 2]))
    assert seen[0] is None and seen[1] is None and seen[2].shape == (2, 6) and seen[2].dtype == torch.bool


def test_layout_built_once_per_forward_and_checkpointing(monkeypatch):
    """Once for all layers, and gradient checkpointing's recompute reuses it (same position_ids object)."""
    calls, real = [], pa.document_layout
    monkeypatch.setattr(pa, "document_layout", lambda *a: calls.append(1) or real(*a))
    model = tiny_model(pa.VARLEN_PACKED)
    _, ids, pos = packed_batch(DOC_LENS)
    _, plain = logits_and_grads(model, [{"input_ids": ids, "position_ids": pos.clone()}])
    model.gradient_checkpointing_enable()
    calls.clear()
    _, checkpointed = logits_and_grads(model, [{"input_ids": ids, "position_ids": pos}])
    assert model.config.num_hidden_layers > 1 and len(calls) == 1
    assert_grads_close(checkpointed, plain, 1e-6)


# ---- packed == separate documents (CPU, fp32) ------------------------------------------------------------------

@pytest.mark.parametrize("attn", ["eager", "sdpa", pa.VARLEN_PACKED])
def test_packed_matches_separate_documents(attn):
    model = tiny_model(attn)
    docs, ids, pos = packed_batch(DOC_LENS)
    ref_logits, ref_grads = logits_and_grads(model, [{"input_ids": d} for d in docs])
    logits, grads = logits_and_grads(model, [{"input_ids": ids, "position_ids": pos}])
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)  # fp32: only summation order differs
    assert_grads_close(grads, ref_grads, 1e-5)  # fp32: summation order only (measured <= 2e-6)


def test_flex_packed_forward_matches_separate_documents():
    model = tiny_model(pa.FLEX_PACKED).eval()
    docs, ids, pos = packed_batch(DOC_LENS)
    with torch.no_grad():
        ref = torch.cat([model(input_ids=d).logits for d in docs], 1)
        torch.testing.assert_close(model(input_ids=ids, position_ids=pos).logits, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="no CPU backward"):
        model.train()(input_ids=ids, position_ids=pos)


def test_several_packed_rows():
    rows = [[5, 1, 9, 3, 12], [12, 12, 6]]  # B=2 rows of 30 tokens, different splits
    model = tiny_model("eager").eval()
    batches = [packed_batch(lens, seed=i) for i, lens in enumerate(rows)]
    ids, pos = torch.cat([b[1] for b in batches]), torch.cat([b[2] for b in batches])
    with torch.no_grad():
        ref = torch.cat([torch.cat([model(input_ids=d).logits for d in b[0]], 1) for b in batches])
        for attn in ["sdpa", pa.VARLEN_PACKED, pa.FLEX_PACKED]:
            model.set_attn_implementation(attn)
            torch.testing.assert_close(model(input_ids=ids, position_ids=pos).logits, ref, atol=1e-5, rtol=1e-5)


def test_collator_kwargs_same_as_position_ids():
    """DataCollatorWithFlattening(return_flash_attn_kwargs=True) hands cu_seq_lens_q/k, max_length_q/k to the model;
    they reach the attention function as kwargs and varlen_packed uses them as they are."""
    docs, _, _ = packed_batch(DOC_LENS)
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_position_ids=True)(
        [{"input_ids": d[0].tolist()} for d in docs])
    assert "cu_seq_lens_q" in batch
    model = tiny_model(pa.VARLEN_PACKED).eval()
    with torch.no_grad():
        with_kwargs = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        from_positions = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    torch.testing.assert_close(with_kwargs, from_positions, atol=0, rtol=0)


def test_our_collator_hands_the_same_document_layout_as_transformers():
    """sft.collate.PackedCollator's cu_seq_lens/max_length are DataCollatorWithFlattening's, and the model gives the
    same logits with them as from the position_ids restarts alone."""
    from sft.collate import PackedCollator

    docs, _, _ = packed_batch(DOC_LENS)
    rows = [{"input_ids": d[0].tolist(), "labels": d[0].tolist(), "lengths": [d.shape[1]]} for d in docs]
    ours = PackedCollator()(rows)
    theirs = DataCollatorWithFlattening(return_flash_attn_kwargs=True)([{"input_ids": d[0].tolist()} for d in docs])
    for key in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"):
        assert torch.equal(torch.as_tensor(ours[key]), torch.as_tensor(theirs[key]).to(torch.int32)), key
    model = tiny_model(pa.VARLEN_PACKED).eval()
    with torch.no_grad():
        with_layout = model(**{k: v for k, v in ours.items() if k != "labels"}).logits
        from_positions = model(input_ids=ours["input_ids"], position_ids=ours["position_ids"]).logits
    torch.testing.assert_close(with_layout, from_positions, atol=0, rtol=0)


@pytest.mark.parametrize("attn", [pa.VARLEN_PACKED, pa.FLEX_PACKED, "sdpa"])
def test_packed_detection_skipped_for_ours_only(attn, monkeypatch):
    """Without a padding mask our implementations need no mask at all: transformers' packed-sequence detection (a host
    sync) must not run for them, and must still run, unchanged, for every other implementation."""
    from transformers import masking_utils
    from transformers.models.qwen3_moe import modeling_qwen3_moe

    calls = []

    def counting_detection(position_ids):
        calls.append(position_ids.shape)
        return find_packed_sequence_indices(position_ids)

    monkeypatch.setattr(modeling_qwen3_moe, "create_causal_mask", modeling_qwen3_moe.create_causal_mask)
    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", counting_detection)
    pa.skip_packed_detection()
    pa.skip_packed_detection()  # idempotent: one wrapper
    assert not getattr(modeling_qwen3_moe.create_causal_mask.__wrapped__, "skips_packed_detection", False)
    docs, ids, pos = packed_batch(DOC_LENS)
    model = tiny_model(attn).eval()
    with torch.no_grad():
        out = model(input_ids=ids, position_ids=pos).logits
        ref = torch.cat([model(input_ids=d).logits for d in docs], 1)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert bool(calls) == (attn == "sdpa"), calls


@pytest.mark.parametrize("mask", [[[1] * 7, [1] * 4 + [0] * 3], [[1] * 7, [0] * 3 + [1] * 4]], ids=["right", "left"])
def test_padded_batch_matches_eager(mask):
    mask = torch.tensor(mask)
    model = tiny_model("eager").eval()
    ids = torch.randint(0, 1000, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        for attn in ["sdpa", pa.VARLEN_PACKED, pa.FLEX_PACKED]:
            model.set_attn_implementation(attn)
            out = model(input_ids=ids, attention_mask=mask).logits
            torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], atol=1e-5, rtol=1e-5, msg=attn)


def test_all_ones_mask_keeps_documents_apart():
    """A collator that sends attention_mask=ones with packed position_ids turns off transformers' packing detection
    (it only looks when the mask is None), so sdpa lets documents see each other; ours still separates them."""
    model = tiny_model("sdpa").eval()
    docs, ids, pos = packed_batch(DOC_LENS)
    ones = torch.ones_like(ids)
    with torch.no_grad():
        ref = torch.cat([model(input_ids=d).logits for d in docs], 1)
        leaky = model(input_ids=ids, position_ids=pos, attention_mask=ones).logits
        model.set_attn_implementation(pa.VARLEN_PACKED)
        ours = model(input_ids=ids, position_ids=pos, attention_mask=ones).logits
    assert (leaky - ref).abs().max() > 1e-3
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_unpacked_batch_takes_plain_causal_path(monkeypatch):
    called = []
    monkeypatch.setattr(pa, "_varlen_reference", lambda *a: called.append("varlen"))
    model = tiny_model(pa.VARLEN_PACKED).eval()
    with torch.no_grad():
        model(input_ids=torch.randint(0, 1000, (2, 9)))
    assert called == []


# ---- varlen_attn signature adapter (fake kernels with the signatures of torch 2.10 / 2.11 / 2.13) ----------------

def _fake_210(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False, return_aux=None): ...
def _fake_211(q, k, v, cu_q, cu_k, max_q, max_k, window_size=(-1, -1), return_aux=None): ...
def _fake_213(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1),
              enable_gqa=False, seqused_k=None, block_table=None, num_splits=None): ...


@pytest.mark.parametrize("fake,expect", [
    (_fake_210, {"is_causal": True}), (_fake_211, {"window_size": (-1, 0)}),
    (_fake_213, {"window_size": (-1, 0), "scale": 0.125, "enable_gqa": True})], ids=["2.10", "2.11", "2.13"])
def test_varlen_signature_adapter(fake, expect, monkeypatch):
    import inspect
    seen = {}

    def kernel(q, k, v, cu, cu_k, max_q, max_k, **kw):
        seen.update(kw)  # compute like the real kernel would, with the repeated heads if the adapter repeated them
        return pa._varlen_reference(q, k, v, cu, max_q, kw.get("scale"))
    monkeypatch.setattr(pa, "_varlen_attn", lambda: (kernel, frozenset(inspect.signature(fake).parameters)))
    q, k, v = (torch.randn(10, h, 64, dtype=torch.bfloat16) for h in (4, 2, 2))
    cu = torch.tensor([0, 3, 10], dtype=torch.int32)
    out = pa._varlen_kernel(q, k, v, cu, 7, 0.125)
    assert seen == expect
    torch.testing.assert_close(out, pa._varlen_reference(q, k, v, cu, 7, 0.125))


def test_varlen_without_scale_argument_refuses_other_scaling(monkeypatch):
    monkeypatch.setattr(pa, "_varlen_attn", lambda: (None, frozenset(["window_size"])))
    with pytest.raises(RuntimeError, match="no scale argument"):
        pa._varlen_kernel(*(torch.randn(4, 2, 64, dtype=torch.bfloat16) for _ in range(3)),
                          torch.tensor([0, 4], dtype=torch.int32), 4, 0.5)


# ---- choose_attention and unsupported setups -------------------------------------------------------------------

def test_choose_attention(monkeypatch):
    assert pa.choose_attention("auto", "cpu") == "sdpa"
    assert pa.choose_attention("varlen_packed", "cpu") == "varlen_packed"
    with pytest.raises(ValueError, match="choose one of"):
        pa.choose_attention("flash", "cpu")
    with pytest.raises(ValueError, match="no backward"):
        pa.choose_attention("flex_packed", "cpu")
    monkeypatch.setattr(pa.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="flash_attn package"):
        pa.choose_attention("flash_attention_2", "cuda")
    monkeypatch.setattr(pa, "_varlen_attn", lambda: ("fn", frozenset()))
    assert pa.choose_attention("auto", "cuda") == "varlen_packed"
    monkeypatch.setattr(pa, "_varlen_attn", lambda: None)
    assert pa.choose_attention("auto", torch.device("cuda", 0)) == "flex_packed"
    monkeypatch.setattr(pa.importlib.util, "find_spec", lambda name: object())
    assert pa.choose_attention("auto", "cuda") == "flash_attention_2"


def test_unsupported_setups_raise_with_a_fix():
    class Attn(torch.nn.Module):
        is_causal = True
    q, k = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8)
    with pytest.raises(ValueError, match="use_cache=False"):
        pa.varlen_packed_forward(Attn(), q, k[:, :, :5], k[:, :, :5], None)
    with pytest.raises(ValueError, match="use_sliding_window=False"):
        pa.varlen_packed_forward(Attn(), q, k, k, None, sliding_window=4)
    with pytest.raises(ValueError, match="2D padding mask"):
        pa.flex_packed_forward(Attn(), q, k, k, torch.ones(1, 1, 6, 6, dtype=torch.bool))


# ---- GPU: the real kernels in bf16 -----------------------------------------------------------------------------

def _err(a, b):
    return (a.float() - b.float()).abs().max().item()


@needs_cuda
@pytest.mark.parametrize("attn", [pa.VARLEN_PACKED, pa.FLEX_PACKED])
def test_gpu_kernel_matches_per_document_fp32(attn):
    """Qwen3-30B-A3B attention shapes (32 q / 4 kv heads, head_dim 128), a long-tailed mix incl. a 1-token document.
    bf16 tolerance: our error against the fp32 per-document reference may be at most 2x (+1e-3) that of bf16 sdpa run
    per document -- the bf16 rounding any kernel pays, so only a masking or indexing bug fails it."""
    lens = [900, 1, 17, 300, 64, 2, 700, 64]
    S, fn = sum(lens), dict(varlen_packed=pa.varlen_packed_forward, flex_packed=pa.flex_packed_forward)[attn]
    pos = torch.cat([torch.arange(n) for n in lens])[None].cuda()
    torch.manual_seed(0)
    qkv = [torch.randn(1, h, S, 128, device="cuda", dtype=torch.bfloat16) for h in (32, 4, 4)]
    module = type("Attn", (torch.nn.Module,), {"is_causal": True})()

    def run(dtype, per_doc):
        ins = [t.detach().to(dtype).requires_grad_() for t in qkv]
        if per_doc:
            bounds = [0, *torch.tensor(lens).cumsum(0).tolist()]
            out = torch.cat([F.scaled_dot_product_attention(*(t[:, :, a:b] for t in ins), is_causal=True,
                                                            scale=128 ** -0.5, enable_gqa=True).transpose(1, 2)
                             for a, b in zip(bounds[:-1], bounds[1:])], 1)
        else:
            out = fn(module, *ins, None, scaling=128 ** -0.5, position_ids=pos)[0]
        out.float().mul(torch.linspace(-1, 1, S, device="cuda")[None, :, None, None]).sum().backward()
        return [out] + [t.grad for t in ins]

    ref, bf16, ours = run(torch.float32, True), run(torch.bfloat16, True), run(torch.bfloat16, False)
    for name, r, b, o in zip(["out", "dq", "dk", "dv"], ref, bf16, ours):
        assert _err(o, r) <= 2 * _err(b, r) + 1e-3, f"{attn} {name}: {_err(o, r)} vs bf16 sdpa {_err(b, r)}"


@needs_cuda
@pytest.mark.parametrize("attn", [pa.VARLEN_PACKED, pa.FLEX_PACKED])
def test_gpu_model_packed_matches_separate(attn):
    """The tiny model in bf16: packed logits/grads vs each document alone through the same weights under stock sdpa
    (its causal path; varlen_packed on CUDA would take a lone document through its own kernel). atol 2e-2 / rtol
    2e-2: bf16 keeps 8 mantissa bits (~4e-3 relative per rounding), compounded over 2 layers."""
    model = tiny_model(attn, device="cuda", dtype=torch.bfloat16)
    docs, ids, pos = packed_batch(DOC_LENS, device="cuda")
    reference = tiny_model("sdpa", device="cuda", dtype=torch.bfloat16)
    ref_logits, ref_grads = logits_and_grads(reference, [{"input_ids": d} for d in docs])
    logits, grads = logits_and_grads(model, [{"input_ids": ids, "position_ids": pos}])
    torch.testing.assert_close(logits, ref_logits, atol=2e-2, rtol=2e-2)
    assert_grads_close(grads, ref_grads, 2e-2)
    alone_logits, alone_grads = logits_and_grads(model, [{"input_ids": d} for d in docs])  # rows of one document
    torch.testing.assert_close(alone_logits, ref_logits, atol=2e-2, rtol=2e-2)
    assert_grads_close(alone_grads, ref_grads, 2e-2)

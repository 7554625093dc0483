"""Attention for padding-free packed batches, registered with transformers as "varlen_packed" and "flex_packed".

A packed batch is input_ids [B, S] whose position_ids restart at each document (see tests/test_packed_attention.py).
Under "sdpa" transformers 5.17 detects the restarts (masking_utils.find_packed_sequence_indices) and builds a dense
block-diagonal mask: 12.6 ms fwd+bwd for one 8192-token row of 4 documents on an H200, against 2.7 ms for
`varlen_attn` or compiled `flex_attention` (bench/results/baselines_h200_202611.md, attention section). Both our implementations:
  packed or padded batch -> documents only (varlen kernel on the unpadded tokens, or flex with a document BlockMask);
  one document per row, no padding -> plain causal sdpa (nothing to mask); varlen_packed on CUDA keeps the varlen
  kernel, with each row a document.
The document layout (cu_seqlens, doc ids, BlockMask) is derived once per forward from position_ids and the 2D padding
mask and shared by all layers, unless the batch carries it (sft/collate.py's PackedCollator and transformers'
DataCollatorWithFlattening hand cu_seq_lens_q and max_length_q to the model). Importing this module registers the
two names; `skip_packed_detection` is the one patch, and only for these names.

Shapes: B batch, S sequence, H query heads, K key/value heads, D head dim, T non-padding tokens, N documents.
"""
from __future__ import annotations

import functools
import importlib.util
import inspect
import logging
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from monkey_patch.errors import PatchError

logger = logging.getLogger(__name__)

VARLEN_PACKED = "varlen_packed"
FLEX_PACKED = "flex_packed"
CHOICES = ("auto", "sdpa", "eager", "flash_attention_2", "flex_attention", VARLEN_PACKED, FLEX_PACKED)


@dataclass(eq=False)
class DocLayout:
    """Where the documents of a [B, S] batch are. Built once per forward (see `document_layout`)."""

    plain: bool  # one document per row and no padding: plain causal attention is exact
    token_idx: torch.Tensor | None  # [T] flat indices into B*S of the non-padding tokens; None: all B*S tokens
    cu_seqlens: torch.Tensor  # [N + 1] int32, document offsets into the T kept tokens
    max_seqlen: int
    doc_ids: torch.Tensor  # [B, S] document number within its row, -1 on padding
    block_mask: object = None  # flex BlockMask, built on first use by flex_packed


def document_layout(position_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> DocLayout:
    """position_ids [B, S] (or [1, S] with attention_mask [B, S]); attention_mask [B, S], 1/True = real token.

    A document starts at each row start, wherever the position does not grow by exactly 1 (the rule of transformers'
    masking_utils.find_packed_sequence_indices, so our documents are the ones sdpa would mask), and at the first real
    token after padding (left padding). Padding must be a contiguous run at the start or end of a row.
    """
    if position_ids.ndim != 2:
        raise ValueError(f"position_ids must be [batch, seq], got shape {tuple(position_ids.shape)}")
    if attention_mask is not None:
        position_ids = position_ids.expand(attention_mask.shape[0], -1)
    starts_BS = torch.ones_like(position_ids, dtype=torch.bool)
    starts_BS[:, 1:] = position_ids[:, 1:] - position_ids[:, :-1] != 1
    token_idx = None
    kept_starts = starts_BS.reshape(-1)
    if attention_mask is not None:
        valid_BS = attention_mask.to(torch.bool)
        starts_BS[:, 1:] |= valid_BS[:, 1:] & ~valid_BS[:, :-1]
        token_idx = valid_BS.reshape(-1).nonzero().squeeze(1)
        kept_starts = starts_BS.reshape(-1)[token_idx]
    first_N = kept_starts.nonzero().squeeze(1)
    total = torch.tensor([kept_starts.numel()], device=first_N.device)
    cu_seqlens = torch.cat([first_N, total]).to(torch.int32)
    max_seqlen = int(cu_seqlens.diff().max()) if kept_starts.numel() else 0  # one host sync per forward
    doc_ids = starts_BS.to(torch.int32).cumsum(-1, dtype=torch.int32) - 1
    if attention_mask is not None:
        doc_ids = doc_ids.masked_fill(~valid_BS, -1)
    plain = token_idx is None and first_N.numel() == position_ids.shape[0]
    return DocLayout(plain, token_idx, cu_seqlens, max_seqlen, doc_ids)


_CACHE: dict = {}


@torch.compiler.disable
def _cached_layout(position_ids, attention_mask, query) -> DocLayout:
    """One layout per forward: Qwen3MoeModel hands every layer the same position_ids and mask objects, so identity
    + in-place version is the key (gradient checkpointing's recompute passes them again; a miss only recomputes)."""
    if position_ids is None:  # attention module called outside Qwen3MoeModel: positions are 0..S-1
        position_ids = torch.arange(query.shape[2], device=query.device)[None]
    key = tuple(None if t is None or t.is_inference() else t._version for t in (position_ids, attention_mask))
    hit = _CACHE.get("entry")
    if hit is not None and hit[0]() is position_ids and hit[1]() is attention_mask and hit[2] == key:
        return hit[3]
    layout = document_layout(position_ids.expand(query.shape[0], -1), attention_mask)
    mask_ref = (lambda: None) if attention_mask is None else weakref.ref(attention_mask)
    _CACHE["entry"] = (weakref.ref(position_ids), mask_ref, key, layout)
    return layout


def _check_supported(module, query, key, attention_mask, dropout, sliding_window, name):
    if query.shape[2] != key.shape[2]:
        raise ValueError(f"{name} is for training without a KV cache (got {query.shape[2]} queries, {key.shape[2]} "
                         "keys): load the model with use_cache=False, or use attn_implementation='sdpa' to generate")
    if attention_mask is not None and attention_mask.ndim != 2:
        raise ValueError(f"{name} takes a 2D padding mask, got a {attention_mask.ndim}D mask: pass attention_mask "
                         "[batch, seq] (or none and packed position_ids), or use attn_implementation='sdpa'")
    if sliding_window is not None or dropout or not getattr(module, "is_causal", True):
        raise ValueError(f"{name} implements causal attention without sliding window or dropout (got sliding_window="
                         f"{sliding_window}, dropout={dropout}); set config.use_sliding_window=False, "
                         "attention_dropout=0.0, or use attn_implementation='sdpa'")


def _plain_causal(query, key, value, scaling):
    """query [B, H, S, D], key/value [B, K, S, D] -> [B, S, H, D]; sdpa's is_causal path builds no mask."""
    out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling,
                                         enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous()


@functools.cache
def _varlen_attn():
    """(torch.nn.attention.varlen.varlen_attn, its parameter names), or None where this torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def _varlen_kernel(q_TH, k_TK, v_TK, cu_seqlens, max_seqlen, scaling):
    """Causal attention within documents; q [T, H, D], k/v [T, K, D] -> [T, H, D]. The signature changed across
    releases (first: is_causal=; 2.11: window_size=(-1, 0), no GQA argument; 2.13: keyword-only window_size, scale,
    enable_gqa), so it is read at run time."""
    if _varlen_attn() is None:
        raise RuntimeError(f"torch {torch.__version__} has no torch.nn.attention.varlen: use "
                           "attn_implementation='flex_packed' or 'auto'")
    if q_TH.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"varlen_attn runs in bf16/fp16, the model is {q_TH.dtype}: load it with dtype=bfloat16")
    fn, params = _varlen_attn()
    kwargs = {}
    if "is_causal" in params:
        kwargs["is_causal"] = True
    elif "window_size" in params:
        kwargs["window_size"] = (-1, 0)  # a tuple: torch 2.13 tests `window_size == (-1, 0)`, a list reads non-causal
    else:
        raise RuntimeError(f"unknown varlen_attn signature {sorted(params)}; use attn_implementation='flex_packed'")
    if "scale" in params:
        kwargs["scale"] = scaling
    elif scaling is not None and abs(scaling - q_TH.shape[-1] ** -0.5) > 1e-9:
        raise RuntimeError("this torch's varlen_attn has no scale argument and the model's scaling is not "
                           "head_dim**-0.5; use attn_implementation='flex_packed'")
    if k_TK.shape[1] != q_TH.shape[1]:
        # Grouped K/V go to the flash kernel as they are: it reads kv head h // (H // K) for query head h, the order
        # of transformers' repeat_kv. torch 2.13 wants that said (enable_gqa); 2.11's signature has no flag and takes
        # the grouped heads as well (tests/test_packed_attention.py, GPU); 2.10's is unverified, so it keeps copies.
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        elif "is_causal" in params:
            rep = q_TH.shape[1] // k_TK.shape[1]
            k_TK, v_TK = k_TK.repeat_interleave(rep, dim=1), v_TK.repeat_interleave(rep, dim=1)
    return fn(q_TH, k_TK, v_TK, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kwargs)


def _varlen_reference(q_TH, k_TK, v_TK, cu_seqlens, max_seqlen, scaling):
    """Plain-torch stand-in for `_varlen_kernel` (CPU, where varlen_attn does not run): one causal sdpa per document."""
    bounds = cu_seqlens.tolist()
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        q, k, v = (t[start:end].transpose(0, 1)[None] for t in (q_TH, k_TK, v_TK))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=q.shape[1] != k.shape[1])
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs) if outs else q_TH.new_zeros(q_TH.shape)


def varlen_packed_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                          sliding_window=None, position_ids=None, **kwargs):
    """AttentionInterface function. query [B, H, S, D], key/value [B, K, S, D], attention_mask None or [B, S] bool
    (from `padding_only_mask`), position_ids [B or 1, S] (transformers 5.17 passes it down as a kwarg, as it does a
    collator's cu_seq_lens_q/k and max_length_q/k). Returns ([B, S, H, D], None)."""
    _check_supported(module, query, key, attention_mask, dropout, sliding_window, VARLEN_PACKED)
    B, H, S, D = query.shape
    cu, max_len = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if B == 1 and attention_mask is None and cu is not None and max_len is not None:
        token_idx, cu, max_len = None, cu.to(torch.int32), int(max_len)  # DataCollatorWithFlattening's own
    else:
        layout = _cached_layout(position_ids, attention_mask, query)
        # On CUDA a row that is one document is a document for the varlen kernel too: sdpa's causal path took 1.0 s
        # of host time, forward and backward, in one H200 run whose fullest row was a single 8,192-token document
        # (py-spy of bench/train_step.py), and the flash kernel reads grouped K/V heads as they are.
        if layout.plain and not query.is_cuda:
            return _plain_causal(query, key, value, scaling), None
        token_idx, cu, max_len = layout.token_idx, layout.cu_seqlens, layout.max_seqlen
    q, k, v = (t.transpose(1, 2).reshape(B * S, t.shape[1], D) for t in (query, key, value))
    if token_idx is not None:
        q, k, v = q[token_idx], k[token_idx], v[token_idx]
    out = (_varlen_kernel if query.is_cuda else _varlen_reference)(q, k, v, cu, max_len, scaling)
    if token_idx is not None:  # padding rows get zeros; nothing downstream reads them
        out = out.new_zeros(B * S, H, D).index_copy(0, token_idx, out)
    return out.view(B, S, H, D), None


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention)  # eager flex materialises the scores: compile is what makes it fast


def _document_block_mask(doc_ids: torch.Tensor):
    """BlockMask for causal attention within documents of doc_ids [B, S]; padding (-1) only sees padding."""
    from torch.nn.attention.flex_attention import create_block_mask

    def same_doc_causal(b, h, q_idx, kv_idx):
        return (doc_ids[b, q_idx] == doc_ids[b, kv_idx]) & (q_idx >= kv_idx)

    B, S = doc_ids.shape
    extra = {"_compile": True} if doc_ids.is_cuda and "_compile" in inspect.signature(create_block_mask).parameters else {}
    return create_block_mask(same_doc_causal, B, None, S, S, device=doc_ids.device, **extra)


def flex_packed_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                        sliding_window=None, position_ids=None, **kwargs):
    """AttentionInterface function; same arguments and result as `varlen_packed_forward`."""
    _check_supported(module, query, key, attention_mask, dropout, sliding_window, FLEX_PACKED)
    B, H, S, D = query.shape
    layout = _cached_layout(position_ids, attention_mask, query)
    if layout.plain:
        return _plain_causal(query, key, value, scaling), None
    if layout.block_mask is None:
        layout.block_mask = _document_block_mask(layout.doc_ids)
    if query.is_cuda:
        flex = _compiled_flex()
    elif torch.is_grad_enabled() and query.requires_grad:
        raise RuntimeError("torch's flex_attention has no CPU backward: train on CPU with attn_implementation="
                           "'sdpa' or 'varlen_packed'")
    else:  # CPU forward only (tests): eager flex, which warns that it is unfused
        from torch.nn.attention.flex_attention import flex_attention as flex
    out = flex(query, key, value, block_mask=layout.block_mask, scale=scaling, enable_gqa=H != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


def padding_only_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                      attention_mask=None, **kwargs):
    """AttentionMaskInterface function: hands the layers the 2D padding mask (None when there is no padding), never a
    dense [B, 1, S, S] mask. Without a registered mask function, create_causal_mask returns None for an unknown
    implementation name, silently dropping the padding mask (transformers 5.17 masking_utils._preprocess_mask_arguments)."""
    if attention_mask is None or (attention_mask.shape[-1] == kv_length and bool(attention_mask.all())):
        return None
    return attention_mask[:, -kv_length:]


for _name, _fn in ((VARLEN_PACKED, varlen_packed_forward), (FLEX_PACKED, flex_packed_forward)):  # idempotent
    AttentionInterface.register(_name, _fn)
    AttentionMaskInterface.register(_name, padding_only_mask)


def _without_packed_detection(create_mask):
    """`create_mask` (transformers' create_causal_mask) that returns None at once for our implementations when there is
    no padding mask: what `padding_only_mask` returns then anyway, minus transformers' packed-sequence detection that
    runs before it (masking_utils.find_packed_sequence_indices asks the GPU whether any row is packed: a host sync at
    the start of every forward, which empties the queue the previous step's optimizer left for the host to run ahead
    of)."""
    if getattr(create_mask, "skips_packed_detection", False):
        return create_mask

    @functools.wraps(create_mask)
    def create(config, inputs_embeds, attention_mask, *args, **kwargs):
        if attention_mask is None and config._attn_implementation in (VARLEN_PACKED, FLEX_PACKED):
            return None
        return create_mask(config, inputs_embeds, attention_mask, *args, **kwargs)

    create.skips_packed_detection = True
    return create


def skip_packed_detection() -> None:
    """Process-wide, for Qwen3-MoE: its model's forward looks create_causal_mask up in its module. Idempotent; models
    on any other attention implementation get transformers' function unchanged."""
    from transformers.models.qwen3_moe import modeling_qwen3_moe

    modeling_qwen3_moe.create_causal_mask = _without_packed_detection(modeling_qwen3_moe.create_causal_mask)


def choose_attention(requested: str, device: torch.device | str) -> str:
    """The attn_implementation to load the model with, for the --attn_implementation flag value `requested`.

    auto: flash_attention_2 if flash_attn is installed; on CUDA else varlen_packed, else flex_packed; on CPU "sdpa"
    (transformers' own packed-position_ids detection keeps it correct there). Explicit values are checked.
    """
    cuda = torch.device(device).type == "cuda"
    has_flash_attn = importlib.util.find_spec("flash_attn") is not None
    if requested not in CHOICES:
        raise PatchError(f"--attn_implementation {requested!r}: choose one of {', '.join(CHOICES)}")
    if requested == "auto":
        chosen = ("flash_attention_2" if cuda and has_flash_attn else VARLEN_PACKED if cuda and _varlen_attn()
                  else FLEX_PACKED if cuda else "sdpa")
    else:
        chosen = requested
        problem = {
            "flash_attention_2": not has_flash_attn and "flash_attention_2 needs the flash_attn package "
            "(transformers' fallback downloads a hub kernel, which fails offline): use --attn_implementation auto",
            FLEX_PACKED: not cuda and "flex_packed trains on CUDA only (torch's CPU flex_attention has no backward): "
            "use --attn_implementation sdpa or varlen_packed on CPU",
            VARLEN_PACKED: cuda and _varlen_attn() is None and f"torch {torch.__version__} has no "
            "torch.nn.attention.varlen: use --attn_implementation flex_packed",
        }.get(requested)
        if problem:
            raise PatchError(problem)
    note = " (on CPU: a per-document sdpa loop, a reference, not fast)" if chosen == VARLEN_PACKED and not cuda else ""
    logger.info("attention: --attn_implementation %s -> %s on %s, flash_attn %s, varlen_attn %s%s", requested, chosen,
                torch.device(device), "installed" if has_flash_attn else "absent",
                "available" if _varlen_attn() else "absent", note)
    return chosen

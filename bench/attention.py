"""Attention on packed rows at Qwen3-30B-A3B shapes (32 q / 4 kv heads, head_dim 128, bf16): fwd+bwd ms per provider.

One row of --seq tokens filled with a long-tailed document mix (lognormal lengths, median ~350, seeded) -- the
padding-free batches train.py builds. Providers, all on the same random q/k/v in this one process:
  sdpa_masked       transformers 5.17 "sdpa": create_causal_mask builds a dense block-diagonal [1, 1, S, S] mask
                    from the restarting position_ids, sdpa_attention_forward (which then repeats k/v) uses it
  flex_attention    transformers' own "flex_attention": its BlockMask from the same position_ids
  varlen_packed     ours: torch varlen_attn on cu_seqlens
  flex_packed       ours: compiled flex_attention with a document BlockMask
  sdpa_causal       plain causal sdpa over the whole row: wrong for packing (documents see each other), the
                    unpacked reference, and what varlen_packed/flex_packed run on unpacked batches
Timed: the attention call, fwd+bwd, after warm-up, CUDA events, median of --reps. The mask / document layout is built
once per forward and shared by all 48 layers, so its cost is a separate column ("setup", per forward).
FLOPs: 3 x 4 x D x H x sum(n^2)/2 for fwd+bwd (causal within documents; the convention of bench/results/baselines_h200_202611.md).

  python bench/attention.py [--seq 8192] [--reps 20]
writes the markdown table to stdout and to $OUT/attention.md when $OUT is set.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.report import describe_environment, save_to_out  # noqa: E402

HQ, HKV, D = 32, 4, 128


def doc_mix(seq: int, seed: int = 0) -> list[int]:
    """Lognormal document lengths (median ~350 tokens, a few thousand-token ones) until the row is full."""
    g = torch.Generator().manual_seed(seed)
    lens = []
    while sum(lens) < seq:
        lens.append(max(1, int(torch.empty(1).log_normal_(5.85, 1.0, generator=g))))
    lens[-1] -= sum(lens) - seq
    return [n for n in lens if n > 0]


class Attn(torch.nn.Module):  # what transformers' attention functions read from the module
    is_causal, num_key_value_groups = True, HQ // HKV


def setup(provider: str, pos: torch.Tensor, qkv):
    """(per-forward setup fn, attention fn(q, k, v, prepared) -> out [B, S, H, D]) for one provider."""
    import monkey_patch.packed_attention as pa
    from transformers import Qwen3MoeConfig
    from transformers.masking_utils import create_causal_mask

    module, scale = Attn(), D ** -0.5
    if provider in ("sdpa_masked", "flex_attention"):
        from transformers.integrations.flex_attention import flex_attention_forward
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        cfg = Qwen3MoeConfig(num_attention_heads=HQ, num_key_value_heads=HKV, head_dim=D)
        cfg._attn_implementation = "sdpa" if provider == "sdpa_masked" else "flex_attention"
        embeds = torch.empty(1, pos.shape[1], 1, device=pos.device, dtype=torch.bfloat16)
        fwd = sdpa_attention_forward if provider == "sdpa_masked" else flex_attention_forward
        return (lambda: create_causal_mask(cfg, embeds, None, None, position_ids=pos),
                lambda q, k, v, mask: fwd(module, q, k, v, mask, scaling=scale)[0])
    if provider in ("varlen_packed", "flex_packed"):
        fwd = pa.varlen_packed_forward if provider == "varlen_packed" else pa.flex_packed_forward

        def prepare():
            pa._CACHE.clear()
            layout = pa._cached_layout(pos, None, qkv[0])
            if provider == "flex_packed":
                layout.block_mask = pa._document_block_mask(layout.doc_ids)
        return prepare, lambda q, k, v, _: fwd(module, q, k, v, None, scaling=scale, position_ids=pos)[0]
    if provider == "sdpa_causal":
        return lambda: None, lambda q, k, v, _: pa._plain_causal(q, k, v, scale)
    raise ValueError(provider)


def timed(fn, reps, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(), fn(), end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--providers", nargs="+",
                    default=["sdpa_masked", "flex_attention", "varlen_packed", "flex_packed", "sdpa_causal"])
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: a smoke run of the code paths, not a benchmark
    lens = doc_mix(args.seq)
    pos = torch.cat([torch.arange(n) for n in lens])[None].to(dev)
    g = torch.Generator(device=dev).manual_seed(0)
    qkv = [torch.randn(1, h, args.seq, D, device=dev, generator=g, dtype=torch.bfloat16) for h in (HQ, HKV, HKV)]
    grad_out = torch.randn(1, args.seq, HQ, D, device=dev, generator=g, dtype=torch.bfloat16)
    doc_flops = 3 * 4 * D * HQ * sum(n * n for n in lens) / 2
    rows, ref_out = [], None
    for provider in args.providers:
        try:
            prepare, attend = setup(provider, pos, qkv)
            setup_ms = timed(prepare, 5, warmup=2)
            prepared = prepare()
            q, k, v = (t.detach().requires_grad_() for t in qkv)

            def step():
                out = attend(q, k, v, prepared)
                out.backward(grad_out)
                return out
            torch.cuda.reset_peak_memory_stats() if dev == "cuda" else None
            ms = timed(step, args.reps)
            out = step().detach()
            peak = torch.cuda.max_memory_allocated() / 2 ** 30 if dev == "cuda" else float("nan")
            ref_out = out if ref_out is None else ref_out  # first provider: transformers' sdpa, the reference
            diff = (out.float() - ref_out.float()).abs().max().item()
            rows.append(f"| {provider} | {ms:.2f} | {doc_flops / ms / 1e9:.0f} | {setup_ms:.2f} | {peak:.2f} | {diff:.3g} |")
        except Exception as e:  # one failing provider must not hide the others' numbers
            rows.append(f"| {provider} | failed: {type(e).__name__}: {str(e)[:120]} | | | | |")
    lines = [f"## Attention, one packed row of {args.seq} tokens, {len(lens)} documents "
             f"(max {max(lens)}, median {sorted(lens)[len(lens) // 2]}), {HQ} q / {HKV} kv heads, head_dim {D}, bf16",
             "", f"`python bench/attention.py --seq {args.seq} --reps {args.reps}` on {describe_environment()}", "",
             "| provider | fwd+bwd ms | TFLOP/s (within documents) | setup ms / forward | peak GiB | max diff vs first |",
             "| --- | --- | --- | --- | --- | --- |", *rows,
             "", "sdpa_causal ignores document boundaries (its diff is expected); every other row must be ~1e-2 (bf16)."]
    text = "\n".join(lines)
    print(text)
    save_to_out("attention.md", text)


if __name__ == "__main__":
    main()

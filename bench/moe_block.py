"""MoE experts block at Qwen3-30B-A3B shapes: forward, backward, fwd+bwd time and peak memory, per provider.

Shape legend: T tokens, K top_k, E experts, H hidden, I moe intermediate, S = T*K routed rows.
Providers, all timed in this one process: scattermoe (ours), scattermoe_fp8 (ours with the forward and
input-gradient GEMMs in FP8 e4m3, weight gradients bf16; target >= 1.4x scattermoe fwd+bwd at 32K tokens, issue 5),
grouped_mm (transformers 5 default), liger (LigerExperts), eager (transformers loop; only up to --eager-max tokens).
Each provider is built by one `setup(provider, shape)` factory on the same random bf16 weights and the same
routing (balanced: K distinct uniform experts per token; skewed: Zipf rank^-1.0 probabilities, ranks randomly
permuted, the hottest expert then gets ~0.8*T rows against T*K/E on average). Timing: CUDA events, warm-up,
median of --reps. FLOPs: 3 x 2 x T x K x 3 x H x I for fwd+bwd (1/3 forward, 2/3 backward).

  python bench/moe_block.py [--tokens 4096 8192 16384 32768 65536] [--breakdown 32768]
(--breakdown also lists the FP8 kernels and quantisation passes when scattermoe_fp8 is among --providers)
writes the markdown table to stdout and to $OUT/moe_block.md when $OUT is set.
"""
import argparse
import os
import sys

import torch

# Liger's fused MoE autotunes ~200 kernel configs on first use (liger_kernel/ops/fused_moe_kernels.py 0.8.5); with it
# a first 32K-token run did not finish in 200 s on the H200, beyond this benchmark's device-time budget. Its own
# documented switch pins one config per kernel; the header of every table says which mode ran.
os.environ.setdefault("LIGER_FUSED_MOE_AUTOTUNE", "0")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.report import describe_environment, save_to_out  # noqa: E402

H, I, E, K = 2048, 768, 128, 8
_WEIGHTS = {}


def make_problem(tokens: int, skew: float):
    """Random bf16 x [T, H], weights (drawn once, shared by all providers), routing idx/w [T, K] on the GPU."""
    g = torch.Generator(device="cuda").manual_seed(tokens)
    if not _WEIGHTS:
        g0 = torch.Generator(device="cuda").manual_seed(0)
        _WEIGHTS["gate_up"] = (torch.randn(E, 2 * I, H, device="cuda", generator=g0) / H ** 0.5).bfloat16()
        _WEIGHTS["down"] = (torch.randn(E, H, I, device="cuda", generator=g0) / I ** 0.5).bfloat16()
    x = torch.randn(tokens, H, device="cuda", generator=g).bfloat16()
    probs = torch.arange(1, E + 1, device="cuda", dtype=torch.float32) ** -skew
    probs = probs[torch.randperm(E, device="cuda", generator=g)]
    idx = torch.multinomial(probs.expand(tokens, E), K, replacement=False, generator=g)
    w = torch.softmax(torch.randn(tokens, K, device="cuda", generator=g), dim=-1).bfloat16()
    return x, _WEIGHTS["gate_up"], _WEIGHTS["down"], idx, w


def setup(provider: str, tokens: int, skew: float):
    """(experts module, x [T, H], top_k_index [T, K], top_k_weights [T, K]) for one provider; mod(x, idx, w) -> [T, H]."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts
    cfg = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=K)
    x, gate_up, down, idx, w = make_problem(tokens, skew)
    with torch.device("meta"):  # parameters are replaced below: skip allocating and initialising them
        if provider == "liger":
            from liger_kernel.transformers.swiglu import LigerExperts
            mod = LigerExperts(cfg)
        else:
            import monkey_patch.scattermoe  # noqa: F401  (registers "scattermoe")
            cfg._experts_implementation = provider
            mod = Qwen3MoeExperts(cfg)
    mod.gate_up_proj = torch.nn.Parameter(gate_up)
    mod.down_proj = torch.nn.Parameter(down)
    x.requires_grad_(True)
    w.requires_grad_(True)
    return mod, x, idx, w


def time_provider(provider, tokens, skew, reps, warmup=3):
    mod, x, idx, w = setup(provider, tokens, skew)
    dy = torch.randn(tokens, H, device="cuda", dtype=torch.bfloat16)
    params = [x, w, *mod.parameters()]
    ev = [[torch.cuda.Event(enable_timing=True) for _ in range(3)] for _ in range(reps)]

    def step(e=None):
        for p in params:
            p.grad = None
        if e:
            e[0].record()
        y = mod(x, idx, w)
        if e:
            e[1].record()
        y.backward(dy)
        if e:
            e[2].record()

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    for p in params:
        p.grad = None
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    for e in ev:
        step(e)
    torch.cuda.synchronize()
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    fwd = med([e[0].elapsed_time(e[1]) for e in ev])
    bwd = med([e[1].elapsed_time(e[2]) for e in ev])
    tot = med([e[0].elapsed_time(e[2]) for e in ev])
    del mod, x, w, params
    torch.cuda.empty_cache()
    return {"fwd": fwd, "bwd": bwd, "tot": tot, "peak": peak / 2**30, "peak_extra": (peak - base) / 2**30}


def fp8_parts(x, w1, w2, aw, dy, dh, tok, ws, counts, slot, h):
    """The FP8 path's kernels (name -> (fn, FLOPs)), with operands quantised once up front (ops.py, fp8=True)."""
    from monkey_patch.scattermoe import ops
    from monkey_patch.scattermoe.fp8_quant import quantize_cols_t, quantize_rows
    S, bf = slot.numel(), x.dtype
    gemm = 2 * S * H * 2 * I
    (xq, sx), (w1q, s1), (awq, saw), (w2q, s2) = map(quantize_rows, (x, w1, aw, w2))
    (dyq, sdy), (dhq, sdh), (w2t, s2t), (w1t, s1t) = (quantize_rows(dy), quantize_rows(dh), quantize_cols_t(w2),
                                                      quantize_cols_t(w1))
    return {
        "fp8 quantise X / gate_up / aw / down": (lambda: [quantize_rows(t) for t in (x, w1, aw, w2)], 0),
        "fp8 fwd gate_up GEMM + SwiGLU epilogue": (lambda: ops._gather_matmul(
            xq, w1q, (w1q.stride(0), 1, H), tok, counts, ws, scales=(sx, s1), out_dtype=bf), gemm),
        "fp8 fwd down GEMM (scatter)": (lambda: ops._scatter_matmul(
            awq, w2q, (w2q.stride(0), 1, I), slot, counts, H, scales=(saw, s2), out_dtype=bf), gemm // 2),
        "fp8 quantise dY / dH / down^T / gate_up^T": (
            lambda: (quantize_rows(dy), quantize_rows(dh), quantize_cols_t(w2), quantize_cols_t(w1)), 0),
        "fp8 bwd dY@down + SwiGLU bwd + dw": (lambda: ops._gather_matmul(
            dyq, w2t, (w2t.stride(0), 1, H), tok, counts, ws, h_S2I=h, scales=(sdy, s2t), out_dtype=bf), gemm // 2),
        "fp8 bwd dX GEMM (scatter)": (lambda: ops._scatter_matmul(
            dhq, w1t, (w1t.stride(0), 1, 2 * I), slot, counts, H, scales=(sdh, s1t), out_dtype=bf, backward=True),
            gemm),
    }


def breakdown(tokens, skew, reps=20, fp8=False):
    """Each scattermoe kernel timed alone (events, median) with its FLOPs: where the fwd+bwd time goes."""
    from monkey_patch.scattermoe import ops
    x, w1, w2, idx, w = make_problem(tokens, skew)
    S = tokens * K
    y, h, aw, counts, slot = ops.experts_fwd(x, w1, w2, idx, w)
    tok = torch.div(slot, K, rounding_mode="floor").to(torch.int32)
    ws = w.reshape(-1)[slot].float()
    dy = torch.randn_like(y)
    dh, _ = ops._gather_matmul(dy, w2, (w2.stride(0), I, 1), tok, counts, ws, h_S2I=h)
    buf = torch.empty(S, H, device="cuda", dtype=torch.bfloat16)
    gemm = 2 * S * H * 2 * I  # FLOPs of one [S,H]x[H,2I]-sized GEMM; the down-sized GEMMs are half
    parts = {
        "routing_metadata (sort)": (lambda: ops.routing_metadata(idx, E), 0),
        "fwd gate_up gather GEMM + SwiGLU epilogue": (
            lambda: ops._gather_matmul(x, w1, (w1.stride(0), 1, H), tok, counts, ws), gemm),
        "fwd down GEMM (scatter)": (lambda: ops._scatter_matmul(aw, w2, (w2.stride(0), 1, I), slot, counts, H),
                                    gemm // 2),
        "fwd K-sum [S,H]->[T,H]": (lambda: buf.view(tokens, K, H).sum(1), 0),
        "bwd dY@down + SwiGLU bwd + dw": (
            lambda: ops._gather_matmul(dy, w2, (w2.stride(0), I, 1), tok, counts, ws, h_S2I=h), gemm // 2),
        "bwd d down (wgrad)": (lambda: ops._expert_wgrad(dy, aw, torch.empty_like(w2), counts, a_idx=tok),
                               gemm // 2),
        "bwd dX GEMM (scatter)": (lambda: ops._scatter_matmul(dh, w1, (w1.stride(0), H, 1), slot, counts, H), gemm),
        "bwd d gate_up (wgrad)": (lambda: ops._expert_wgrad(dh, x, torch.empty_like(w1), counts, b_idx=tok), gemm),
    }
    if fp8:
        parts.update(fp8_parts(x, w1, w2, aw, dy, dh, tok, ws, counts, slot, h))
    rows = []
    for name, (fn, flops) in parts.items():
        fn()
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for a, b in ev:
            a.record()
            fn()
            b.record()
        torch.cuda.synchronize()
        ms = sorted(a.elapsed_time(b) for a, b in ev)[reps // 2]
        rows.append((name, ms, flops / ms / 1e9 if flops else float("nan")))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536])
    ap.add_argument("--providers", nargs="+", default=["scattermoe", "scattermoe_fp8", "grouped_mm", "liger", "eager"])
    ap.add_argument("--routing", nargs="+", default=["balanced", "skewed"])
    ap.add_argument("--eager-max", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--breakdown", type=int, nargs="*", default=[])
    args = ap.parse_args()
    import time
    lines = [f"command: `python {' '.join(sys.argv)}`",
             f"{describe_environment()}; LIGER_FUSED_MOE_AUTOTUNE={os.environ['LIGER_FUSED_MOE_AUTOTUNE']}, "
             f"SCATTERMOE_AUTOTUNE={os.environ.get('SCATTERMOE_AUTOTUNE', '1')}, "
             f"SCATTERMOE_FP8_PROMOTE={os.environ.get('SCATTERMOE_FP8_PROMOTE', 'bwd')}",
             f"shapes: H={H} I={I} E={E} K={K}, bf16; median of {args.reps} after 3 warm-ups; "
             "peak = max_memory_allocated over one fwd+bwd (params, inputs, grads included)", "",
             "| routing | tokens | provider | fwd ms | bwd ms | fwd+bwd ms | TFLOP/s | vs grouped_mm | vs liger | "
             "vs scattermoe | peak GiB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    print("\n".join(lines), flush=True)
    for routing in args.routing:
        skew = 0.0 if routing == "balanced" else 1.0
        for tokens in args.tokens:
            res = {}
            for p in args.providers:
                if p == "eager" and tokens > args.eager_max:
                    continue
                t0 = time.time()
                res[p] = time_provider(p, tokens, skew, args.reps)
                print(f"# {routing} {tokens} {p}: {res[p]} ({time.time() - t0:.0f} s incl. setup/compile)",
                      file=sys.stderr, flush=True)
            flops = 3 * 2 * tokens * K * 3 * H * I
            for p, r in res.items():
                ratio = lambda q: f"{res[q]['tot'] / r['tot']:.2f}x" if q in res else "-"  # noqa: E731
                line = (f"| {routing} | {tokens} | {p} | {r['fwd']:.2f} | {r['bwd']:.2f} | {r['tot']:.2f} | "
                        f"{flops / r['tot'] / 1e9:.0f} | {ratio('grouped_mm')} | {ratio('liger')} | "
                        f"{ratio('scattermoe')} | {r['peak']:.2f} |")
                lines.append(line)
                print(line, flush=True)
    for tokens in args.breakdown:
        for routing, skew in (("balanced", 0.0), ("skewed", 1.0)):
            part = ["", f"scattermoe kernels alone, {tokens} tokens, {routing}:", "", "| kernel | ms | TFLOP/s |",
                    "| --- | --- | --- |"]
            rows = breakdown(tokens, skew, fp8="scattermoe_fp8" in args.providers)
            part += [f"| {n} | {ms:.3f} | {tf:.0f} |" for n, ms, tf in rows]
            print("\n".join(part), flush=True)
            lines += part
    save_to_out("moe_block.md", "\n".join(lines))


if __name__ == "__main__":
    main()

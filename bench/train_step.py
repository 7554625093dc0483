"""Whole training step (forward, backward, AdamW) at Qwen3-30B-A3B shapes truncated to N layers, per stack.

The same code path as train.py: the `qwen3-30b-a3b` preset, `monkey_patch.apply_patches`, gradient checkpointing,
gradient clipping and AdamW, packed padding-free batches from `sft.collate` built from a long-tailed document-length
mix, and the Trainer's step, whose NaN/inf check of the loss reads it on the host once per step (see `train_step` in
run_one). Every batch is run once to warm up, then again timed: the time per step is the wall time of the --steps
timed steps, from a sync before the first to a sync after the last, divided by --steps. The warm-up pass compiles
what the batches' shapes need (Triton specialises kernels on their integer arguments, torch.compile on shapes), so
no compilation lands in the timed window (with 3 warm-up batches instead, the first stack of a call to run a kernel
compiled it inside the window: bench/results/train_step_h200_202611.md, run 7).

  python bench/train_step.py                         # every stack, each in its own process, then the table
  python bench/train_step.py --stacks ours,ours_fp8 --layers 8 --seq 8192 --micro_batch 1
  python bench/train_step.py --one ours              # one stack in this process (what the driver runs)
  python bench/train_step.py --stacks ours,liger_flex_compiled --rounds 2   # A B, then B A; means per stack

--rounds N runs the stack list N times, every other round in reverse order, and reports each stack's mean and each
round's time: in run 9 `ours` ran last at 0.167 s/step on a host where it ran alone at 0.147 (4 steps) minutes later,
so one order can carry a drift of the host into the ratio; A B B A averages a steady drift out and shows its size.

Stacks (each in a fresh process: Liger's patches are class-level and would leak between stacks):
  transformers           grouped_mm experts + sdpa (the default; packed batches get its block-diagonal mask)
  liger_experts          + Liger rope/rms_norm/fused-linear-CE + Liger's fused experts (LigerExperts)
  liger_compiled         + Liger rope/rms_norm/fused-linear-CE, grouped_mm experts, each decoder layer compiled
                         (the best row of bench/results/baselines_h200_202611.md)
  liger_flex_compiled    as liger_compiled, with transformers' own flex_attention for the packed documents
  liger_experts_compiled LigerExperts and compiled layers (failed on packed batches in torch.compile's backward)
  ours                   our experts kernel + Liger (no swiglu; 2,048-token fused-CE chunks) + our packed attention
                         + our AdamW kernel with gradient clipping folded in (sft/adamw.py)
  ours_torch_adamw       ours with torch's fused AdamW and clip_grad_norm_, as the other stacks have
  ours_liger_ce_chunks   ours with Liger's own fused-CE chunk sizing (128 tokens here), what the chunking gains
  ours_recompute_experts ours with --recompute_experts true: the experts recomputed in the backward (the default,
                         auto, keeps their activations where the peak cannot rise: at 8 layers and 8K tokens it does)
  ours_compiled          ours with each decoder layer compiled
  ours_fp8               ours + --fp8: dense linears (torchao) and experts (scattermoe_fp8) in FP8, layers compiled
                         (as torchao recommends)
  ours_fp8_dense         ours + --fp8 --fp8_experts false: FP8 for the dense linears only
The peer of the ratio column is the fastest Liger stack of the run.
MFU is over --peak_tflops, default 790: the bf16 dense GEMM rate measured on our H200 (about 770-790),
the same peak bench/results/baselines_h200_202611.md uses, so figures compare with it.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.report import describe_environment, save_to_out  # noqa: E402

# run_one's diagnostic flags and the marks their tables are printed under (main() forwards and relays them).
DIAGNOSTICS = (("lag", "LAG"), ("profile", "PROFILE"), ("trace", "TRACE"), ("memory", "MEMORY"),
               ("sync_debug", "SYNC"))
LIGER_AS_SHIPPED = dict(liger="true", ce_chunk_tokens=0)  # the peers: Liger's own fused-CE chunk sizing
# Ours: what train.py runs on one GPU by default, our AdamW kernel with clipping folded in (sft/adamw.py) included.
OURS = dict(moe_kernel="scattermoe", liger="true", attn_implementation="auto", adamw="ours", recompute_experts="auto")
STACKS = {  # name -> apply_patches arguments, and `adamw`: ours or torch (fused; the default)
    "transformers": dict(moe_kernel="grouped_mm", liger="false", attn_implementation="sdpa"),
    "liger_experts": dict(moe_kernel="liger", attn_implementation="sdpa", **LIGER_AS_SHIPPED),
    "liger_compiled": dict(moe_kernel="grouped_mm", attn_implementation="sdpa", compile_layers="true",
                           **LIGER_AS_SHIPPED),
    "liger_flex_compiled": dict(moe_kernel="grouped_mm", attn_implementation="flex_attention", compile_layers="true",
                                **LIGER_AS_SHIPPED),
    "liger_experts_compiled": dict(moe_kernel="liger", attn_implementation="sdpa", compile_layers="true",
                                   **LIGER_AS_SHIPPED),
    "ours": dict(**OURS),
    "ours_torch_adamw": dict(OURS, adamw="torch"),
    "ours_liger_ce_chunks": dict(OURS, **LIGER_AS_SHIPPED),
    "ours_recompute_experts": dict(OURS, recompute_experts="true"),
    "ours_compiled": dict(OURS, compile_layers="true"),
    "ours_fp8": dict(OURS, fp8=True),  # compiles too
    "ours_fp8_dense": dict(OURS, fp8=True, fp8_experts=False),
}


def document_lengths(total_tokens: int, seq: int, seed: int = 0) -> list[int]:
    """A long-tailed SFT length mix: log-normal, median ~700 tokens, a tail to the full row (clipped to [16, seq])."""
    rng = random.Random(seed)
    lengths, total = [], 0
    while total < total_tokens:
        n = int(min(seq, max(16, rng.lognormvariate(6.55, 1.0))))
        lengths.append(n)
        total += n
    return lengths


def packed_batches(steps: int, micro_batch: int, seq: int, vocab: int, device: str, pad_to_multiple_of=None,
                   seed: int = 0):
    """`steps` packed batches of `micro_batch` rows of `seq` slots, their real-token counts, the packing efficiency
    (real tokens / slots) and the mean causal attention context."""
    from sft.collate import PackedCollator, pack_examples

    rng = random.Random(seed)
    lengths = document_lengths(int(steps * micro_batch * seq * 1.1), seq, seed)
    examples = [{"input_ids": (ids := [rng.randrange(vocab) for _ in range(n)]), "labels": ids} for n in lengths]
    rows = pack_examples(examples, seq)
    rows.sort(key=lambda r: -len(r["input_ids"]))  # the fullest rows, as a long run's steady state has
    rows = rows[:steps * micro_batch]
    if len(rows) < steps * micro_batch:
        raise RuntimeError("not enough packed rows; raise the token budget in packed_batches")
    efficiency = sum(len(r["input_ids"]) for r in rows) / (len(rows) * seq)
    collate = PackedCollator(pad_token_id=0, pad_to_multiple_of=pad_to_multiple_of)
    groups = [rows[i * micro_batch:(i + 1) * micro_batch] for i in range(steps)]
    batches = [collate(group) for group in groups]
    real_tokens = [sum(len(r["input_ids"]) for r in group) for group in groups]  # padding excluded
    lengths_used = [n for r in rows for n in r["lengths"]]
    context = sum(n * n / 2 for n in lengths_used) / sum(lengths_used)
    on_device = [{k: v.to(device) if hasattr(v, "to") else v for k, v in b.items()} for b in batches]  # ints stay
    return on_device, real_tokens, efficiency, context


def profile_table(step, batches: list, device: str) -> str:
    """Run `step(batch)` for each batch under torch.profiler; wall and kernel time per step (sft/profiling.py). All the
    timed batches, not one repeated: rows differ in attention cost (an 8K row of one document costs several times a
    row of short ones); run 9 read a profile of the last batch alone as the timed mean's breakdown (bench/results/
    train_step_h200_202611.md, runs 9 and 10)."""
    import torch
    from torch.profiler import profile

    from sft.profiling import profile_report, profiler_activities

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with profile(activities=profiler_activities(device == "cuda")) as prof:
        sync()  # the wall starts with the GPU empty and ends when its last kernel has finished
        start = time.perf_counter()
        for batch in batches:
            step(batch)
        sync()
        wall = time.perf_counter() - start
    return profile_report(prof, len(batches), wall)


def sync_table(step, device: str) -> str:
    """One `step()` under sync debug mode: where the host waited for the GPU (sft/host_syncs.py)."""
    if device != "cuda":
        return "sync debugging needs CUDA (torch.cuda.set_sync_debug_mode); skipped on this CPU run"
    from sft.host_syncs import host_syncs_table, record_host_syncs
    return host_syncs_table(record_host_syncs(step))


def trace_table(step, stack: str, device: str) -> str:
    """Two `step()`s recorded with Python stacks: where the GPU waited for the host (bench/idle_gaps.py). Two, so that
    the second forward is launched behind the first step's queued optimizer, as in a run. The trace itself goes to
    $OUT/trace_<stack>.json.gz, for `python bench/idle_gaps.py` or chrome://tracing."""
    import gzip
    import shutil
    import tempfile

    from torch.profiler import profile

    from bench.idle_gaps import find_gaps, gap_table, load_trace
    from sft.profiling import profiler_activities

    with profile(activities=profiler_activities(device == "cuda"), with_stack=True) as prof:
        step()
        step()
    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(raw)
        gaps, window = find_gaps(load_trace(raw))
        if os.environ.get("OUT"):
            with open(raw, "rb") as src, gzip.open(os.path.join(os.environ["OUT"], f"trace_{stack}.json.gz"),
                                                   "wb") as dst:
                shutil.copyfileobj(src, dst)
    return gap_table(gaps, window)


def allocator_counts(device: str) -> dict:
    """The caching allocator's cudaMalloc/cudaFree calls and out-of-memory retries so far: each cudaFree or retry
    synchronizes the device without a torch op that sync debug mode would report."""
    import torch

    if device != "cuda":
        return {}
    stats = torch.cuda.memory_stats()
    return {key: stats.get(key, 0) for key in ("num_device_alloc", "num_device_free", "num_alloc_retries",
                                               "num_sync_all_streams")}


def run_one(stack: str, layers: int, seq: int, micro_batch: int, steps: int, peak_tflops: float,
            preset: str = "qwen3-30b-a3b", profile: bool = False, sync_debug: bool = False,
            trace: bool = False, memory: bool = False, max_grad_norm: float = 1.0, lag: bool = False) -> dict:
    import torch
    from monkey_patch import apply_patches
    from sft.adamw import FusedAdamW, clip_grad_norm
    from sft.metrics import flops_per_token
    from sft.model import load_model

    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: a smoke test of this script on the tiny preset
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    patches = dict(STACKS[stack])
    ours_adamw = patches.pop("adamw", "torch") == "ours" and device == "cuda"  # a Triton kernel
    with torch.device(device):  # initialise on the GPU: a CPU init of billions of parameters takes minutes
        model = load_model(preset, dtype=torch.bfloat16, config_overrides={"num_hidden_layers": layers})
    applied = apply_patches(model, device=device, tokens_per_micro_batch=seq * micro_batch, **patches)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = (FusedAdamW(model.parameters(), lr=1e-5) if ours_adamw else
                 torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device == "cuda"))
    fp8 = patches.get("fp8", False)  # FP8 GEMMs need token counts divisible by 16
    batches, real_tokens, efficiency, context = packed_batches(steps, micro_batch, seq, model.config.vocab_size,
                                                               device, pad_to_multiple_of=16 if fp8 else None)

    def train_step(batch, mark=lambda phase: None) -> torch.Tensor:
        """What train.py's Trainer runs per step (transformers 5.17 Trainer._run_epoch): forward, backward, its
        NaN/inf check of the loss (host syncs, the step's only ones outside the model), clip_grad_norm_ (the recipes'
        max_grad_norm is 1.0), AdamW. The optimizer's kernels are left queued: the next step's forward is launched
        while they run, as in train.py, where batches reach the GPU by asynchronous copies (sft/trainer.py).
        `mark` is called at the start and after each phase (--lag)."""
        mark("step start")
        loss = model(**batch).loss
        mark("forward returned")
        loss.backward()
        mark("backward returned")
        bool(torch.isnan(loss) or torch.isinf(loss))  # the Trainer's check reads the loss on the host
        mark("after the loss check (sync)")
        if max_grad_norm > 0:
            clip_grad_norm(list(model.parameters()), max_grad_norm, optimizer)
        mark("clipping launched")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mark("optimizer launched")
        return loss.detach()

    losses = []
    sync()
    start = time.perf_counter()
    for batch in batches:  # the warm-up pass: every shape the timed pass will see, compiled once
        losses.append(train_step(batch))
        sync()
        if len(losses) == 1:
            first_step = time.perf_counter() - start  # compilation and autotuning included
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    allocator_before = allocator_counts(device)
    start = time.perf_counter()
    for batch in batches:
        losses.append(train_step(batch))
    sync()
    seconds = (time.perf_counter() - start) / steps
    allocator = {k: v - allocator_before[k] for k, v in allocator_counts(device).items()}
    shape = f"Stack {stack}, {layers} layers, {seq} x {micro_batch} tokens"

    def show(mark: str, filename: str | None, caption: str, text: str) -> None:
        """Print a diagnostic table under its mark (main() relays it) and save it to $OUT/<filename>."""
        print(f"{mark} {stack}\n{text}", flush=True)
        if filename:
            save_to_out(filename, f"{shape}{caption}\n\n{text}")

    def once() -> float:  # each diagnostic runs extra steps of the last batch (its callers synchronize around them)
        return train_step(batches[-1])

    if lag:  # after the timed steps: the marks' hooks stay out of the timings
        from bench.host_lag import LagMarks
        marks = LagMarks(model)
        sync()
        marks.start()
        for batch in batches:
            train_step(batch, marks.mark)
        sync()
        show("LAG", f"lag_{stack}.md", ": where the GPU waits for the host, events at marks (bench/host_lag.py)",
             marks.table())
        marks.remove()
    if profile:  # after the timed steps, so the profiler's overhead stays out of the timings
        show("PROFILE", f"profile_{stack}.md", ": one more pass over the timed batches",
             profile_table(train_step, batches, device=device))
    if trace:
        show("TRACE", f"idle_{stack}.md", ": two steps, recorded with Python stacks (bench/idle_gaps.py)",
             trace_table(once, stack, device))
    if memory:
        from bench.memory_peak import record_peak
        show("MEMORY", f"memory_{stack}.md", ": one step's allocations at its peak (bench/memory_peak.py)",
             record_peak(once, model, optimizer) if device == "cuda" else
             "the memory peak is a GPU's: it needs CUDA; skipped on this CPU run")
    if sync_debug:  # last: sync debug mode slows every CUDA call it checks
        show("SYNC", f"sync_{stack}.md" if device == "cuda" else None,
             "; the Trainer's NaN/inf check of the loss is one of the syncs", sync_table(once, device))
    tokens = statistics.mean(real_tokens)
    tflops = tokens / seconds * flops_per_token(model.config, context) / 1e12
    peak_gib = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
    return {"stack": stack, "layers": layers, "seq": seq, "micro_batch": micro_batch,
            "sec_per_step": round(seconds, 4), "tokens_per_sec": round(tokens / seconds), "tflops": round(tflops, 1),
            "mfu": round(tflops / peak_tflops, 3), "peak_gib": round(peak_gib, 2),
            "packing_efficiency": round(efficiency, 4), "allocator_in_timed_steps": allocator,
            "first_step_s": round(first_step, 1), "loss_first": round(float(losses[0]), 3),
            "loss_last": round(float(losses[-1]), 3),
            "patches": {k: v for k, v in applied.items() if k != "fp8"}}


def round_order(stacks: list[str], rounds: int) -> list[str]:
    """The stacks of every round, every other round reversed: A B C, C B A, A B C, ..."""
    return [stack for n in range(rounds) for stack in (stacks if n % 2 == 0 else stacks[::-1])]


def mean_over_rounds(results: list[dict]) -> list[dict]:
    """One result per stack, in first-seen order: the mean s/step of its rounds and the rates at that mean (every
    round times the same batches, so tokens per step is fixed), the highest peak, and each round's s/step. A stack
    with a failed round reports the error."""
    stacks = {}
    for r in results:
        stacks.setdefault(r["stack"], []).append(r)
    combined = []
    for stack, runs in stacks.items():
        failed = [r for r in runs if "error" in r]
        if failed or len(runs) == 1:
            combined.append(failed[0] if failed else runs[0])
            continue
        mean = statistics.fmean(r["sec_per_step"] for r in runs)
        speedup = runs[0]["sec_per_step"] / mean
        combined.append({**runs[0], "sec_per_step": round(mean, 4),
                         "tokens_per_sec": round(runs[0]["tokens_per_sec"] * speedup),
                         "tflops": round(runs[0]["tflops"] * speedup, 1), "mfu": round(runs[0]["mfu"] * speedup, 3),
                         "peak_gib": max(r["peak_gib"] for r in runs),
                         "rounds_sec_per_step": [r["sec_per_step"] for r in runs]})
    return combined


def table(results: list[dict]) -> str:
    """Markdown table; the ratio column compares every stack with the fastest Liger stack of the same run."""
    done = [r for r in results if "error" not in r]
    peers = [r for r in done if r["stack"].startswith("liger")]
    peer = max(peers, key=lambda r: r["tokens_per_sec"]) if peers else None
    rounds = any("rounds_sec_per_step" in r for r in done)
    lines = [f"| stack | s/step | tokens/s | TFLOP/s | MFU | peak GiB | vs {peer['stack'] if peer else 'peer'} |"
             + (" s/step per round |" if rounds else ""), "|---" * (8 if rounds else 7) + "|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['stack']} | error: {r['error'][-160:]!r} | | | | | |" + (" |" if rounds else ""))
            continue
        ratio = f"{r['tokens_per_sec'] / peer['tokens_per_sec']:.2f}x" if peer else "-"
        lines.append(f"| {r['stack']} | {r['sec_per_step']:.3f} | {r['tokens_per_sec']:,} | {r['tflops']} | "
                     f"{r['mfu']:.1%} | {r['peak_gib']} | {ratio} |"
                     + (f" {' / '.join(f'{t:.3f}' for t in r.get('rounds_sec_per_step', []))} |" if rounds else ""))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stacks", default="transformers,liger_experts,liger_compiled,liger_flex_compiled,ours,"
                                              "ours_compiled,ours_fp8")
    parser.add_argument("--one", choices=sorted(STACKS), help="run one stack in this process and print its JSON")
    parser.add_argument("--preset", default="qwen3-30b-a3b", help="model preset of config/models/")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--micro_batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--peak_tflops", type=float, default=790.0)
    parser.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping as train.py's recipes "
                        "set it (config/recipes/*.yaml: 1.0); 0 leaves it out")
    parser.add_argument("--lag", action="store_true", help="after timing, run the batches again with CUDA events at "
                        "marks through each step (layers forward, recompute and backward; the step's phases): where "
                        "the GPU waited for the host, as medians over the steps (bench/host_lag.py), printed and "
                        "saved as lag_<stack>.md")
    parser.add_argument("--profile", action="store_true", help="after timing, profile one more pass over the batches: "
                        "wall, kernel time per group (communication apart), GPU idle and the top kernels, printed and "
                        "saved as profile_<stack>.md")
    parser.add_argument("--sync_debug", action="store_true", help="after timing, run one more step under "
                        "torch.cuda.set_sync_debug_mode('warn'): where the host waits for the GPU, counted by call "
                        "site, printed and saved as sync_<stack>.md (CUDA only; skipped on a CPU)")
    parser.add_argument("--trace", action="store_true", help="after timing, record two more steps with Python stacks: "
                        "the GPU's idle gaps, each blamed on the host code that launched the kernel ending it "
                        "(bench/idle_gaps.py), printed and saved as idle_<stack>.md, the trace as trace_<stack>.json.gz")
    parser.add_argument("--memory", action="store_true", help="after timing, record one more step's allocations "
                        "with the profiler: what is live at its memory peak, grouped by the op and frames that "
                        "allocated it (bench/memory_peak.py), printed and saved as memory_<stack>.md (CUDA only)")
    parser.add_argument("--timeout_per_stack", type=float, default=900.0, help="seconds before a stack is abandoned")
    parser.add_argument("--rounds", type=int, default=1, help="run the stack list this many times, every other "
                        "round reversed, and report each stack's mean (see the module docstring)")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: give 1 or more (1 runs each stack once)")
    shape = ["--preset", args.preset, "--layers", str(args.layers), "--seq", str(args.seq),
             "--micro_batch", str(args.micro_batch), "--steps", str(args.steps), "--peak_tflops", str(args.peak_tflops),
             "--max_grad_norm", str(args.max_grad_norm),
             *(f"--{flag}" for flag, _ in DIAGNOSTICS if getattr(args, flag))]
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, args.layers, args.seq, args.micro_batch, args.steps,
                                             args.peak_tflops, args.preset, args.profile, args.sync_debug,
                                             args.trace, args.memory, args.max_grad_norm, args.lag)), flush=True)
        return
    results = []
    for stack in round_order(args.stacks.split(","), args.rounds):
        # Liger's fused-experts autotune tries ~200 configs per shape (minutes); its documented switch pins one config.
        env = dict(os.environ, LIGER_FUSED_MOE_AUTOTUNE=os.environ.get("LIGER_FUSED_MOE_AUTOTUNE", "0"))
        try:
            run = subprocess.run([sys.executable, __file__, "--one", stack, *shape], capture_output=True, text=True,
                                 timeout=args.timeout_per_stack, env=env)
        except subprocess.TimeoutExpired:
            results.append({"stack": stack, "error": f"timed out after {args.timeout_per_stack} s"})
            continue
        found = [line[7:] for line in run.stdout.splitlines() if line.startswith("RESULT ")]
        marks = [run.stdout.index(f"{mark} ") for _, mark in DIAGNOSTICS if f"{mark} " in run.stdout]
        if marks:  # the profile, idle, memory and sync tables the stack printed before its result
            print(run.stdout[min(marks):].split("\nRESULT ")[0], flush=True)
        results.append(json.loads(found[0]) if found else {"stack": stack, "error": (run.stderr or run.stdout)[-400:]})
        print(json.dumps(results[-1]), flush=True)
    rounds = (f"; {args.rounds} rounds, every other one in reverse order, each stack's mean"
              if args.rounds > 1 else "")
    report = (f"Command: python bench/train_step.py {' '.join(sys.argv[1:])}\n\n{describe_environment()}\n\n"
              f"{args.preset} shapes, {args.layers} layers, packed rows of {args.seq} tokens x micro-batch "
              f"{args.micro_batch}, gradient checkpointing, clip_grad_norm_ {args.max_grad_norm or 'off'}, AdamW; "
              f"mean of {args.steps} steps, each batch run once before to warm up (wall time of the timed steps, "
              f"synced at both ends){rounds}; "
              f"MFU over {args.peak_tflops} TFLOP/s.\n\n{table(mean_over_rounds(results))}\n")
    print(report)
    save_to_out("train_step.md", report + "\n```\n" + "\n".join(json.dumps(r) for r in results) + "\n```\n")


if __name__ == "__main__":
    main()

"""Real SFT runs through the launcher (`qwen3_sft.sh` -> train.py, FSDP2 or ZeRO-3), one per backend and feature row,
with the efficiency figures train.py itself logs (`efficiency_summary.json`): what a user gets, not a micro-benchmark.

  python bench/sft_run.py --gpus 2 --backends fsdp,zero3 --rows all --layers 8           # issue: distributed backends
  python bench/sft_run.py --gpus 8 --backends fsdp,zero3 --rows reference --layers 48    # the reference repo's table
  python bench/sft_run.py --gpus 0 --preset tiny --recipe config/recipes/tiny.yaml --layers 2 --seq 256 \
      --rows baseline,packed --steps 4 --backends fsdp                                    # CPU smoke run

Data: a long-tailed synthetic SFT set written for the run (log-normal conversation lengths, median ~700 tokens,
clipped to the sequence length), in the messages format, so the data path is the real one.
Rows (cumulative, as in the reference repo's table):
  baseline    transformers grouped_mm experts, sdpa, padded batches
  liger       + Liger rope / rms_norm / fused linear cross-entropy
  moe_kernel  + our scattermoe experts kernel
  fp8         + selective FP8
  packed      + packed padding-free batches with our varlen attention
  all         every feature (the recommended setup)
`--rows all` runs only the last row; `--rows reference` runs every row.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.report import describe_environment, save_to_out  # noqa: E402

WORDS = ("model data train token expert route layer batch shard gradient memory kernel tensor vector matrix "
         "attention sequence document packing optimizer schedule checkpoint resume metric speed loss").split()

ROWS = {  # name -> train.py flags, cumulative
    "baseline": ["--moe_kernel", "grouped_mm", "--liger", "false", "--attn_implementation", "sdpa", "--packing", "false"],
    "liger": ["--moe_kernel", "grouped_mm", "--liger", "true", "--attn_implementation", "sdpa", "--packing", "false"],
    "moe_kernel": ["--moe_kernel", "scattermoe", "--liger", "true", "--attn_implementation", "sdpa", "--packing", "false"],
    "fp8": ["--moe_kernel", "scattermoe", "--liger", "true", "--attn_implementation", "sdpa", "--packing", "false",
            "--fp8", "true"],
    "packed": ["--moe_kernel", "scattermoe", "--liger", "true", "--attn_implementation", "auto", "--packing", "true"],
    "all": ["--moe_kernel", "scattermoe", "--liger", "true", "--attn_implementation", "auto", "--packing", "true",
            "--fp8", "true"],
}


def write_dataset(path: Path, tokens: int, seq: int, seed: int = 0) -> Path:
    """About `tokens` tokens of conversations with log-normal lengths (one word is ~1-2 tokens)."""
    rng = random.Random(seed)
    total = 0
    with open(path, "w") as file:
        while total < tokens:
            words = int(min(seq * 0.6, max(8, rng.lognormvariate(6.2, 1.0))))
            prompt = max(4, words // 5)
            text = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))  # noqa: E731
            file.write(json.dumps({"messages": [{"role": "user", "content": text(prompt)},
                                                {"role": "assistant", "content": text(words - prompt)}]}) + "\n")
            total += int(words * 1.3) + 20
    return path


def run(backend: str, row: str, args, data: Path, workdir: Path) -> dict:
    output_dir = workdir / f"{backend}_{row}"
    flags = ["--model_name_or_path", args.preset, "--num_hidden_layers", str(args.layers), "--dataset", str(data),
             "--max_seq_length", str(args.seq), "--per_device_train_batch_size", str(args.micro_batch),
             "--gradient_accumulation_steps", "1", "--max_steps", str(args.steps), "--logging_steps", "2",
             "--save_strategy", "no", "--save_final_model", "false", "--output_dir", str(output_dir),
             "--peak_tflops", str(args.peak_tflops), "--report_to", "none", *ROWS[row], *args.extra_flags.split()]
    if args.gpus == 0:  # the CPU smoke run: Liger is GPU-only
        flags += ["--bf16", "false", "--gradient_checkpointing", "false", "--liger", "false"]
    env = dict(os.environ, NUM_GPUS=str(args.gpus), BACKEND=backend, RECIPE=args.recipe, NCCL_NVLS_ENABLE="0",
               LIGER_FUSED_MOE_AUTOTUNE="0")
    # Its own process group, so a run past its time is killed with every worker the launcher started.
    launcher = subprocess.Popen(["bash", str(REPO / "qwen3_sft.sh"), *flags], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = launcher.communicate(timeout=args.timeout_per_run)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        stdout, stderr = launcher.communicate()
        stderr += f"\ntimed out after {args.timeout_per_run:.0f} s"
    (workdir / f"{backend}_{row}.log").write_text(stdout + stderr)
    summary_path = output_dir / "efficiency_summary.json"
    if launcher.returncode != 0 or not summary_path.exists():
        return {"backend": backend, "row": row, "error": (stderr or stdout)[-300:]}
    return {"backend": backend, "row": row, **json.loads(summary_path.read_text()),
            **median_interval(output_dir / "metrics.jsonl")}


def median_interval(metrics_path: Path) -> dict:
    """The median logging interval's s/step and tokens/s/GPU, the first interval left out: the figure runs are
    compared by. train.py's summary (totals over every interval but the first) is what a user gets, but one
    interval can skew it: the first 2-GPU FSDP2 run of a call, on a cold Triton cache, logged 12.5, 2.29, 0.48, 0.24,
    0.24, 0.25 s/step (intervals of 2 steps; summary 0.70), and every run of the next call had one interval of the
    ten at about twice its neighbours' time (steps 17-18, the same data in every run)."""
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()][1:]
    if not records:
        return {}
    median = sorted(records, key=lambda record: record["sec_per_step"])[(len(records) - 1) // 2]
    return {"median_sec_per_step": median["sec_per_step"],
            "median_tokens_per_sec_per_gpu": median["tokens_per_sec_per_gpu"]}


def show_profile(backend: str, row: str, workdir: Path) -> None:
    """Print rank 0's `--profile_steps` report of a run (sft/callbacks.py) and copy it to $OUT."""
    path = workdir / f"{backend}_{row}" / "profile_rank0.md"
    if not path.exists():
        print(f"no profile for {backend} {row}: {path} was not written (see {backend}_{row}.log)", flush=True)
        return
    text = path.read_text()
    print(f"PROFILE {backend} {row}\n{text}", flush=True)
    save_to_out(f"profile_{backend}_{row}.md", f"{backend} {row}, {path}\n\n{text}")


def table(results: list[dict]) -> str:
    lines = ["| backend | row | s/step | tokens/s/GPU | MFU | median interval: s/step | median interval: tokens/s/GPU | "
             "peak GiB | first -> last loss |", "|---" * 9 + "|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['backend']} | {r['row']} | error: {r['error'][-150:]!r} |" + " |" * 6)
            continue
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
        lines.append(f"| {r['backend']} | {r['row']} | {r['sec_per_step']:.3f} | {r['tokens_per_sec_per_gpu']:,.0f} | "
                     f"{mfu} | {r.get('median_sec_per_step', '-')} | {r.get('median_tokens_per_sec_per_gpu', 0):,.0f} | "
                     f"{r['peak_mem_gib']} | {r['first_loss']:.3f} -> {r['last_loss']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, required=True, help="GPUs on this node (0: a CPU smoke run)")
    parser.add_argument("--backends", default="fsdp,zero3")
    parser.add_argument("--rows", default="all", help="all, reference, or a comma list of " + ", ".join(ROWS))
    parser.add_argument("--preset", default="qwen3-30b-a3b")
    parser.add_argument("--recipe", default="config/recipes/qwen3-30b-a3b.yaml")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--micro_batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--peak_tflops", type=float, default=790.0, help="790: the bf16 GEMM rate measured on our H200")
    parser.add_argument("--extra_flags", default="", help="train.py flags appended to every run, e.g. "
                        "'--compile_layers false' (the last value of a flag wins); with '--profile_steps N' each run's "
                        "profile_rank0.md is printed after its row and saved as profile_<backend>_<row>.md")
    parser.add_argument("--timeout_per_run", type=float, default=1200.0)
    args = parser.parse_args()
    rows = list(ROWS) if args.rows == "reference" else ["all"] if args.rows == "all" else args.rows.split(",")
    workdir = Path(os.environ.get("OUT") or tempfile.mkdtemp(prefix="sft_run_"))
    data = write_dataset(workdir / "length_mix.jsonl", tokens=int(args.steps * max(1, args.gpus) * args.micro_batch
                                                                   * args.seq * 1.5), seq=args.seq)
    results = []
    for backend in args.backends.split(","):
        for row in rows:
            results.append(run(backend, row, args, data, workdir))
            print(json.dumps(results[-1]), flush=True)
            if "--profile_steps" in args.extra_flags:
                show_profile(backend, row, workdir)
    report = (f"Command: python bench/sft_run.py {' '.join(sys.argv[1:])}\n\n{describe_environment()}\n\n{args.preset} with {args.layers} layers, "
              f"sequence {args.seq}, micro-batch {args.micro_batch}, {max(1, args.gpus)} device(s), {args.steps} steps; "
              f"figures from train.py's efficiency_summary.json (first logging interval left out), MFU over "
              f"{args.peak_tflops} TFLOP/s.\n\n{table(results)}\n")
    print(report)
    (workdir / "sft_run.md").write_text(report)


if __name__ == "__main__":
    main()

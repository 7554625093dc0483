"""FP8 loss parity: the same run from one seed in bf16, with --fp8 (dense linears + experts), and with FP8 for the
dense linears only; per-step losses side by side and the final-loss gap (issue target: within 2% of bf16).

  python bench/fp8_parity.py                          # Qwen3-30B-A3B shapes, 4 layers, 300 steps, one GPU
  python bench/fp8_parity.py --layers 4 --steps 300 --seq 2048 --micro_batch 2

Each run is `train.py` itself (one process each) on the long-tailed synthetic conversations of bench/sft_run.py:
random words, so the loss falls to the words' entropy plus the chat template and cannot be memorised to zero, where a
relative gap would mean little. With a GPU per run (e.g. 4), the runs go side by side, one per GPU. "Final loss" is
the mean of the last 10% of logged steps (one step's loss is noisy).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.report import describe_environment, save_to_out  # noqa: E402
from bench.sft_run import write_dataset  # noqa: E402

RUNS = {"bf16": ["--fp8", "false"], "fp8": ["--fp8", "true"],
        "fp8_dense_only": ["--fp8", "true", "--fp8_experts", "false"]}


def start(name: str, args, data: Path, workdir: Path, gpu: int | None) -> subprocess.Popen:
    """Launch train.py for run `name` (on GPU `gpu` alone when given)."""
    flags = ["--model_name_or_path", args.preset, "--num_hidden_layers", str(args.layers), "--dataset", str(data),
             "--max_seq_length", str(args.seq), "--packing", "true", "--per_device_train_batch_size",
             str(args.micro_batch), "--max_steps", str(args.steps), "--learning_rate", str(args.lr),
             "--lr_scheduler_type", "cosine", "--warmup_steps", str(args.steps // 15), "--bf16", str(args.gpu).lower(),
             "--gradient_checkpointing", "true", "--logging_steps", "1", "--save_strategy", "no",
             "--save_final_model", "false", "--output_dir", str(workdir / name), "--report_to", "none", "--seed", "0",
             *RUNS[name]]
    env = dict(os.environ, **({"CUDA_VISIBLE_DEVICES": str(gpu)} if gpu is not None else {}))
    with open(workdir / f"{name}.log", "w") as log:  # the child keeps its own copy of the file descriptor
        return subprocess.Popen([sys.executable, str(REPO / "train.py"), *flags], stdout=log,
                                stderr=subprocess.STDOUT, env=env)


def finish(name: str, process: subprocess.Popen, args, workdir: Path) -> list[dict]:
    """The run's per-step records (metrics.jsonl); RuntimeError with the log's tail if it failed."""
    try:
        process.wait(timeout=args.timeout_per_run)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    metrics = workdir / name / "metrics.jsonl"
    if process.returncode != 0 or not metrics.exists():
        log = (workdir / f"{name}.log").read_text()
        raise RuntimeError(f"{name}: train.py failed (exit {process.returncode}): {log[-600:]}")
    return [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]


def final_loss(records: list[dict]) -> float:
    tail = records[-max(1, len(records) // 10):]
    return sum(r["loss"] for r in tail) / len(tail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="qwen3-30b-a3b")
    parser.add_argument("--layers", type=int, default=4, help="FP8 skips the first and last layer: 4 converts two")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro_batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--runs", default=",".join(RUNS))
    parser.add_argument("--timeout_per_run", type=float, default=900.0)
    args = parser.parse_args()
    args.gpu = torch.cuda.is_available()  # a CPU run is a smoke test of this script (bf16 run only)
    workdir = Path(os.environ.get("OUT") or tempfile.mkdtemp(prefix="fp8_parity_"))
    data = write_dataset(workdir / "length_mix.jsonl", tokens=int(args.steps * args.micro_batch * args.seq * 1.3),
                         seq=args.seq)
    curves, errors = {}, {}
    names = args.runs.split(",")
    # One GPU per run when there are enough (the runs are independent), else one after another.
    side_by_side = args.gpu and torch.cuda.device_count() >= len(names)
    batches = [list(enumerate(names))] if side_by_side else [[(None, name)] for name in names]
    for batch in batches:
        started = [(name, start(name, args, data, workdir, gpu)) for gpu, name in batch]
        for name, process in started:
            try:
                curves[name] = finish(name, process, args, workdir)
            except RuntimeError as error:
                errors[name] = str(error)
            print(name, "done" if name in curves else errors[name], flush=True)
    lines = ["| run | final loss (mean of last 10%) | vs bf16 | s/step | peak GiB |", "|---|---|---|---|---|"]
    reference = final_loss(curves["bf16"]) if "bf16" in curves else None
    for name, records in curves.items():
        loss = final_loss(records)
        gap = f"{(loss - reference) / reference:+.2%}" if reference else "-"
        steady = records[len(records) // 10:]
        seconds = sum(r["sec_per_step"] for r in steady) / len(steady)
        lines.append(f"| {name} | {loss:.4f} | {gap} | {seconds:.3f} | {max(r['peak_mem_gib'] for r in records)} |")
    lines += [f"| {name} | error: {message[-200:]!r} | | | |" for name, message in errors.items()]
    every = max(1, args.steps // 30)
    curve_lines = ["| step | " + " | ".join(curves) + " |", "|---" * (len(curves) + 1) + "|"]
    for i in range(0, min(len(r) for r in curves.values()) if curves else 0, every):
        curve_lines.append(f"| {curves[next(iter(curves))][i]['step']} | "
                           + " | ".join(f"{records[i]['loss']:.4f}" for records in curves.values()) + " |")
    report = (f"Command: python bench/fp8_parity.py {' '.join(sys.argv[1:])}\n\n{describe_environment()}\n\n"
              f"{args.preset} with {args.layers} layers, packed rows of {args.seq} x micro-batch {args.micro_batch}, "
              f"{args.steps} steps, lr {args.lr} cosine, seed 0, random-word conversations.\n\n" + "\n".join(lines)
              + "\n\nLoss every " + str(every) + " steps:\n\n" + "\n".join(curve_lines) + "\n")
    print(report)
    save_to_out("fp8_parity.md", report)


if __name__ == "__main__":
    main()

"""Plot a run's metrics.jsonl: loss and throughput against the step, as a PNG.

  python -m sft.plot outputs/tiny-sft/metrics.jsonl             # writes outputs/tiny-sft/metrics.png
  python -m sft.plot run_a/metrics.jsonl run_b/metrics.jsonl -o compare.png
"""
from __future__ import annotations

import argparse
import json
import os


def read_metrics(path: str) -> list[dict]:
    with open(path) as file:
        return [json.loads(line) for line in file if line.strip()]


def plot(paths: list[str], output: str) -> str:
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    figure, (loss_axis, speed_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for path in paths:
        records = read_metrics(path)
        label = os.path.basename(os.path.dirname(os.path.abspath(path)))
        steps = [r["step"] for r in records]
        loss_axis.plot(steps, [r.get("loss") for r in records], label=label)
        speed_axis.plot(steps, [r.get("tokens_per_sec_per_gpu") for r in records], label=label)
    loss_axis.set(xlabel="step", ylabel="training loss", title="loss")
    speed_axis.set(xlabel="step", ylabel="real tokens / s / GPU", title="throughput")
    for axis in (loss_axis, speed_axis):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(output, dpi=100)
    return output


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics", nargs="+", help="metrics.jsonl files written by train.py")
    parser.add_argument("-o", "--output", help="PNG path (default: metrics.png beside the first file)")
    args = parser.parse_args(argv)
    output = args.output or os.path.join(os.path.dirname(os.path.abspath(args.metrics[0])), "metrics.png")
    print(plot(args.metrics, output))


if __name__ == "__main__":
    main()

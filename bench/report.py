"""What every benchmark report shares: one line naming the device, versions and git commit, and where it is saved."""
from __future__ import annotations

import importlib.metadata
import os
import subprocess

PACKAGES = ("torch", "transformers", "triton", "liger-kernel", "torchao", "accelerate", "deepspeed")


def describe_environment() -> str:
    import torch
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (a smoke run, not a measurement)"
    versions = []
    for package in PACKAGES:
        try:
            versions.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{package} missing")
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return f"{device}; {', '.join(versions)}; git {sha or 'n/a (a copy without .git)'}"


def save_to_out(filename: str, text: str) -> None:
    """Write a report to $OUT/<filename> when $OUT is set (the GPU machine returns what lands there)."""
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], filename), "w") as file:
            file.write(text if text.endswith("\n") else text + "\n")

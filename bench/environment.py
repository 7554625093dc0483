"""One line naming the device, the library versions and the git commit, for every benchmark report."""
from __future__ import annotations

import importlib.metadata
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

"""Where a step makes the host wait for the GPU: every such wait leaves the GPU idle until the host launches again.

`torch.cuda.set_sync_debug_mode("warn")` warns at each synchronizing CUDA call (`.item()`, `.cpu()`, `nonzero`, a
blocking copy, ...). We record the Python stack at each warning and count the warnings by their innermost frames
outside torch, which name the line of our code (or transformers', Liger's) that asked for the sync.
In the backward pass (seen on the H200, torch 2.11): a Python backward (an autograd.Function's, such as Liger's fused
cross-entropy) runs on the autograd engine's thread and is reported at its own line, once; a sync inside a C++
backward op (a boolean-mask index's) is re-raised when `backward()` returns and is reported at the `backward()` call.
"""
from __future__ import annotations

import os
import sys
import traceback
import warnings
from collections import Counter

import torch

TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
SKIPPED_FILES = (os.path.abspath(__file__), os.path.abspath(warnings.__file__))
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def short_path(filename: str) -> str:
    """Relative to the repo, else to the import root it was found under (site-packages, or a --target folder)."""
    if filename.startswith(REPO_ROOT):
        return filename[len(REPO_ROOT):]
    roots = [root.rstrip(os.sep) + os.sep for root in sys.path if root]
    root = max((r for r in roots if filename.startswith(r)), key=len, default="")
    return filename[len(root):]


def caller_frames(stack: list[traceback.FrameSummary], depth: int = 3) -> tuple[str, ...]:
    """Where a sync was asked for: the torch function called (`torch/_tensor.py:item`; "-" when no torch Python frame
    is on the stack: a C++ op called directly), then the innermost `depth` frames of `stack` that are not inside torch
    or this module, innermost first, as `file:line function`. `stack` is outermost first (`traceback.extract_stack`)."""
    outside = [i for i, f in enumerate(stack)
               if not f.filename.startswith(TORCH_DIR) and os.path.abspath(f.filename) not in SKIPPED_FILES]
    below = stack[outside[-1] + 1:] if outside else stack
    entry = next((f for f in below if f.filename.startswith(TORCH_DIR)), None)
    torch_call = f"torch/{entry.filename[len(TORCH_DIR):]}:{entry.name}" if entry else "-"
    frames = [stack[i] for i in reversed(outside[-depth:])]
    return (torch_call, *(f"{short_path(f.filename)}:{f.lineno} {f.name}" for f in frames))


def record_host_syncs(step) -> Counter:
    """Run `step()` once under sync debug mode "warn"; {caller frames: number of synchronizing calls}. Needs CUDA."""
    if not torch.cuda.is_available():
        raise RuntimeError("sync debugging needs CUDA (torch.cuda.set_sync_debug_mode); there is no GPU here")
    sites, show_other, in_step = Counter(), warnings.showwarning, [False]
    previous = torch.cuda.get_sync_debug_mode()

    def on_warning(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            show_other(message, category, filename, lineno, file, line)
        elif in_step[0]:  # the first use of sync debug mode in a process warns once from set_sync_debug_mode itself
            sites[caller_frames(traceback.extract_stack())] += 1  # (H200, torch 2.11: around a step that did nothing)

    with warnings.catch_warnings():
        warnings.simplefilter("always")  # the default filter shows a warning once per line; we count every call
        warnings.showwarning = on_warning
        torch.cuda.set_sync_debug_mode("warn")
        try:
            in_step[0] = True
            step()
        finally:
            in_step[0] = False
            torch.cuda.set_sync_debug_mode(previous)
    return sites


def host_syncs_table(sites: Counter) -> str:
    lines = [f"{sum(sites.values())} synchronizing CUDA calls in one step (torch.cuda.set_sync_debug_mode('warn')); "
             "syncs of C++ backward ops show at the backward() call.", "",
             "| syncs | torch call | where (innermost frame first) |", "|---|---|---|"]
    lines += [f"| {count} | `{torch_call}` | {' <- '.join(f'`{frame}`' for frame in frames) or '(inside torch only)'} |"
              for (torch_call, *frames), count in sites.most_common()]
    return "\n".join(lines)

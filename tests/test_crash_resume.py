"""A run killed mid-training resumes from its last checkpoint (`--resume_from_checkpoint latest`) and ends at the
same losses as an uninterrupted run.

Both crashes are distributed, so the checkpoints resumed from are the sharded ones: FSDP2 killed by SIGKILL (a node
lost: no handler runs, a checkpoint may be half written) and ZeRO-3 killed by SIGTERM (a preemption). SIGKILL/SIGTERM
go to the whole process group (launcher and both ranks). The uninterrupted reference is one process with the same
global batch (tests/test_distributed.py shows the three backends agree to ~1e-7); tolerance 1e-4, as there. The
2-process runs go through accelerate launch with the CPU shim described in tests/test_distributed.py.

Runtime on 2 busy CPU cores: about 150 s (one reference, two killed runs, two resumes).
"""
import json
import os
import signal
import subprocess
import time

import pytest

from tests.conftest import REPO_ROOT
from tests.test_distributed import (assert_same_losses, distributed_command, initial_weights, losses, run,  # noqa: F401
                                    run_env, single_command)

STEPS = 6


def kill_after_checkpoint(command: list[str], output_dir, step: int, sig: int) -> None:
    """Start `command` (2 processes), wait until checkpoint-`step` is complete (trainer_state.json and both ranks'
    RNG states whole, as `--resume_from_checkpoint latest` requires), then send `sig` to its whole process group."""
    from sft.trainer import checkpoint_is_complete
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    checkpoint = str(output_dir / f"checkpoint-{step}")
    deadline = time.monotonic() + 300
    while not checkpoint_is_complete(checkpoint, world_size=2):
        if process.poll() is not None:
            pytest.fail(f"the run ended before checkpoint-{step}:\n{process.stdout.read()[-3000:]}")
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.05)
    os.killpg(process.pid, sig)
    process.wait(timeout=60)
    if sig == signal.SIGTERM:  # torchrun may outlive its workers a moment; nothing of the group may keep training
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not (output_dir / "model.safetensors").exists(), "the run finished before it was killed"
    assert not (output_dir / f"checkpoint-{STEPS}").exists()


@pytest.fixture(scope="module")
def uninterrupted(initial_weights, tmp_path_factory) -> dict[int, float]:
    output_dir = tmp_path_factory.mktemp("uninterrupted")
    run(single_command("--model_name_or_path", str(initial_weights), "--max_steps", str(STEPS),
                       "--output_dir", str(output_dir), "--per_device_train_batch_size", "2"))
    return losses(output_dir)


@pytest.mark.parametrize("backend, sig", [("fsdp", signal.SIGKILL), ("zero3", signal.SIGTERM)])
def test_killed_run_resumes_to_the_same_losses(initial_weights, uninterrupted, tmp_path, backend, sig):
    output_dir = tmp_path / "out"
    flags = ["--model_name_or_path", str(initial_weights), "--max_steps", str(STEPS), "--output_dir", str(output_dir)]
    kill_after_checkpoint(distributed_command(backend, tmp_path, *flags), output_dir, 2, sig)

    before = [line for line in (output_dir / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= 2]
    run(distributed_command(backend, tmp_path, *flags, "--resume_from_checkpoint", "latest"))
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    # Continued after checkpoint-2, not restarted: the records up to step 2 are the killed run's, kept as they were
    # (anything it logged after the checkpoint is dropped and logged again), and every step appears once.
    assert lines[:len(before)] == before and len(before) == 2
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5, 6]
    assert_same_losses(losses(output_dir), uninterrupted)
    assert (output_dir / "model.safetensors").exists()  # the consolidated final model


def test_latest_skips_a_checkpoint_left_half_written(tmp_path):
    """A run killed while saving leaves checkpoint-N without trainer_state.json, or (several ranks) with it beside
    another rank's RNG state still being written: both are skipped."""
    import torch
    from sft.trainer import latest_checkpoint
    for step, state, ranks in ((2, True, 2), (10, True, 2), (12, False, 2), (14, True, 1), (16, True, 2)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if state:
            (folder / "trainer_state.json").write_text("{}")
        for rank in range(ranks):
            torch.save({"python": [rank] * 100}, folder / f"rng_state_{rank}.pth")
    whole = (tmp_path / "checkpoint-16" / "rng_state_1.pth").read_bytes()
    (tmp_path / "checkpoint-16" / "rng_state_1.pth").write_bytes(whole[:len(whole) // 2])  # truncated by the kill
    assert latest_checkpoint(str(tmp_path), world_size=2) == str(tmp_path / "checkpoint-10")  # numeric order
    assert latest_checkpoint(str(tmp_path / "missing"), world_size=2) is None

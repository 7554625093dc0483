"""qwen3_sft.sh and qwen3_sft_multinode.sh, run as a user runs them but with DRY_RUN=1 (they print the global batch and
the command instead of launching): a missing or bad variable is named, the global batch is per-device x accumulation x
world size, GLOBAL_BATCH sets the accumulation or says why it cannot, and the backends pick our config files.
Runtime: about 15 s (each dry run reads the batch flags through sft.arguments, a transformers import)."""
import os
import subprocess

import pytest
import torch

from tests.conftest import REPO_ROOT

NODE = {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1", "GPUS_PER_NODE": "8", "DRY_RUN": "1"}


def launch(script: str, env: dict, *flags) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT",
                                                             "GPUS_PER_NODE", "GLOBAL_BATCH", "BACKEND", "RECIPE")}
    base.update(TORCHAO_FORCE_SKIP_LOADING_SO_FILES="1", HF_HUB_OFFLINE="1")
    return subprocess.run(["bash", script, *flags], cwd=REPO_ROOT, env={**base, **env}, capture_output=True,
                          text=True)


@pytest.mark.parametrize("missing", ["NNODES", "NODE_RANK", "MASTER_ADDR"])
def test_multinode_names_the_missing_variable(missing):
    done = launch("qwen3_sft_multinode.sh", {k: v for k, v in NODE.items() if k != missing})
    assert done.returncode == 2
    assert f"error: {missing} is not set" in done.stderr


@pytest.mark.parametrize("env, message", [
    ({"NODE_RANK": "2"}, "NODE_RANK=2: an integer in 0..1"),
    ({"NNODES": "two"}, "NNODES=two"),
    ({"GPUS_PER_NODE": "0"}, "GPUS_PER_NODE=0: no GPU found"),
    ({"BACKEND": "nope"}, "BACKEND=nope: no accelerate config"),
])
def test_multinode_rejects_bad_values(env, message):
    done = launch("qwen3_sft_multinode.sh", {**NODE, **env})
    assert done.returncode == 2 and message in done.stderr, done.stderr


def test_multinode_global_batch_and_command():
    """The 30B recipe: per-device 1, accumulation 4; 2 nodes x 8 GPUs -> 64 sequences per optimizer step."""
    done = launch("qwen3_sft_multinode.sh", {**NODE, "RECIPE": "config/recipes/qwen3-30b-a3b.yaml"},
                  "--output_dir", "out")
    assert done.returncode == 0, done.stderr
    assert ("global batch = per_device_train_batch_size 1 x gradient_accumulation_steps 4 x world size 16 "
            "(2 nodes x 8 GPUs) = 64 sequences per step") in done.stdout
    command = done.stdout.strip().splitlines()[-1]
    assert command.startswith("NCCL_NVLS_ENABLE=0 accelerate launch --config_file config/accelerate/fsdp2.yaml")
    for part in ("--num_machines 2", "--machine_rank 1", "--main_process_ip 10.0.0.1", "--main_process_port 29500",
                 "--num_processes 16", "train.py --config config/recipes/qwen3-30b-a3b.yaml --output_dir out"):
        assert part in command


def test_global_batch_sets_accumulation_and_flags_win():
    """--per_device_train_batch_size 2 on the command line overrides the recipe; GLOBAL_BATCH=64 over 16 ranks -> 2."""
    done = launch("qwen3_sft_multinode.sh", {**NODE, "GLOBAL_BATCH": "64", "BACKEND": "zero3", "MASTER_PORT": "29999"},
                  "--per_device_train_batch_size", "2")
    assert done.returncode == 0, done.stderr
    assert "x gradient_accumulation_steps 2 x world size 16 (2 nodes x 8 GPUs) = 64 sequences" in done.stdout
    command = done.stdout.strip().splitlines()[-1]
    assert "--config_file config/accelerate/zero3.yaml" in command and "--main_process_port 29999" in command
    assert command.endswith("--per_device_train_batch_size 2 --gradient_accumulation_steps 2")


def test_global_batch_that_does_not_divide_is_an_error():
    done = launch("qwen3_sft_multinode.sh", {**NODE, "GLOBAL_BATCH": "40"}, "--per_device_train_batch_size", "2")
    assert done.returncode == 2
    assert "GLOBAL_BATCH=40 is not a multiple of per_device_train_batch_size x world size = 2 x 16 = 32" in done.stderr


def test_one_node_script_uses_all_gpus_or_one_process():
    several = launch("qwen3_sft.sh", {"NUM_GPUS": "4", "DRY_RUN": "1"}, "--max_steps", "3")
    assert several.returncode == 0, several.stderr
    assert "world size 4 (1 nodes x 4 GPUs)" in several.stdout
    assert "--num_machines 1 --machine_rank 0 --main_process_ip 127.0.0.1" in several.stdout
    single = launch("qwen3_sft.sh", {"NUM_GPUS": "0", "DRY_RUN": "1"}, "--max_steps", "3")
    assert single.returncode == 0 and single.stdout.strip() == "python train.py --config config/recipes/tiny.yaml --max_steps 3"
    one_gpu = launch("qwen3_sft.sh", {"NUM_GPUS": "1", "DRY_RUN": "1"}, "--max_steps", "3")
    assert one_gpu.stdout.strip().startswith("python train.py")
    one_gpu_zero3 = launch("qwen3_sft.sh", {"NUM_GPUS": "1", "BACKEND": "zero3", "DRY_RUN": "1"}, "--max_steps", "3")
    assert one_gpu_zero3.returncode == 0, one_gpu_zero3.stderr
    assert "--config_file config/accelerate/zero3.yaml" in one_gpu_zero3.stdout
    assert "world size 1 (1 nodes x 1 GPUs)" in one_gpu_zero3.stdout


@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO_ROOT / "config" / "recipes").glob("*.yaml")))
def test_every_recipe_parses(recipe, tmp_path):
    """Every key of every recipe is a flag train.py knows (transformers 5 dropped some, e.g. warmup_ratio)."""
    from sft.arguments import parse_arguments

    bf16_off = [] if torch.cuda.is_available() else ["--bf16", "false"]  # bf16 needs a GPU to pass validation
    model_args, _, _, training_args = parse_arguments(["--config", str(REPO_ROOT / "config" / "recipes" / recipe),
                                                       "--output_dir", str(tmp_path), *bf16_off])
    assert model_args.model_name_or_path and training_args.learning_rate > 0

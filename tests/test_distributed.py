"""FSDP2 and DeepSpeed ZeRO-3 on CPU (2 processes, gloo): the same per-step losses as one process with the same global
batch, and one consolidated stock-layout checkpoint that stock transformers loads.

How it runs: the real `train.py` through `accelerate launch` with our real config files
(config/accelerate/fsdp2.yaml; config/accelerate/zero3.yaml + config/zero3.json with the tiny model's threshold from
`python -m sft.zero3 --write`). On a machine without CUDA, accelerate 1.15 never selects FSDP (state.py only upgrades
GPU-like distributed types, so the processes silently train as plain DDP on MULTI_CPU) and never gives DeepSpeed a
backend (world size 1, then DeepSpeed's batch assertion fails). `CPU_SHIM` below, used only by the tests, fixes exactly
those two choices before train.py runs: it gives DeepSpeed gloo and upgrades MULTI_CPU to FSDP when an FSDP plugin
exists. Everything else is production code: accelerate's fsdp2_prepare_model (fully_shard per Qwen3MoeDecoderLayer,
activation checkpointing, DTensor parameters, sharded DCP checkpoints), DeepSpeed's ZeRO-3 engine and leaf modules, and
our SFTTrainer.save_model. The FSDP run is checked to really shard (pytorch_model_fsdp_0/ in its checkpoint).

Tolerance: losses within 1e-4 (absolute, on losses near 11), final weights within 1e-4. All runs are fp32 from the
same saved initial weights (a preset's random init under ZeRO-3's zero.Init differs from the plain one), the loss is
normalised by the global count of target tokens (Trainer's average_tokens_across_devices), and one optimizer step sees
the same two packed rows; what remains is reduction order in the all-reduce / reduce-scatter, ~1e-7 here. A wrongly
normalised loss (mean of per-rank means) is off by 0.09 at step 2, a doubled loss by 11.

Runtime on 2 busy CPU cores: about 100 s (three training runs of 4 steps and one load).
"""
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO_ROOT

CPU_SHIM = '''"""Test-only: let accelerate run FSDP2 and DeepSpeed on CPU processes (see tests/test_distributed.py)."""
import os, runpy, sys
import torch
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_partial_init = PartialState.__init__
def _init_partial(self, cpu=False, **kwargs):
    if not torch.cuda.is_available():
        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false") == "true":
            kwargs["backend"] = "gloo"    # accelerate leaves it None without CUDA: world size 1
        else:
            cpu = True                    # MULTI_CPU with gloo, as --use_cpu would
    _partial_init(self, cpu, **kwargs)
PartialState.__init__ = _init_partial

_state_init = AcceleratorState.__init__
def _init_state(self, *args, fsdp_plugin=None, **kwargs):
    _state_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    fsdp_plugin = fsdp_plugin or self.__dict__.get("fsdp_plugin")  # later AcceleratorState() calls reset the type
    if fsdp_plugin is not None and self.distributed_type in (DistributedType.NO, DistributedType.MULTI_CPU):
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
AcceleratorState.__init__ = _init_state

sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
runpy.run_path(sys.argv[0], run_name="__main__")
'''

# Short fp32 run, constant learning rate so every step moves the weights the same way in every backend.
SHORT_RUN = ["--config", "config/recipes/tiny.yaml", "--max_seq_length", "128", "--model_dtype", "float32",
             "--learning_rate", "3e-3", "--lr_scheduler_type", "constant", "--warmup_steps", "0", "--logging_steps", "1",
             "--save_steps", "2", "--save_total_limit", "2"]
LOSS_ATOL = 1e-4
WEIGHT_ATOL = 1e-4


def run_env() -> dict:
    return dict(os.environ, TORCHAO_FORCE_SKIP_LOADING_SO_FILES="1", HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu",
                OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_command(*flags) -> list[str]:
    """One process; `flags` should hold --per_device_train_batch_size 2 for the global batch of two 1-row ranks."""
    return [sys.executable, "train.py", *SHORT_RUN, *flags]


def distributed_command(backend: str, workdir: Path, *flags) -> list[str]:
    """2 processes through accelerate launch with our config for `backend` ("fsdp" or "zero3"), on CPU."""
    shim = workdir / "cpu_shim.py"
    shim.write_text(CPU_SHIM)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2",
              "--main_process_port", str(free_port())]
    if backend == "fsdp":
        launch += ["--config_file", "config/accelerate/fsdp2.yaml"]
    else:
        zero3 = workdir / "zero3_tiny.json"  # config/zero3.json with the tiny model's recommended threshold
        subprocess.run([sys.executable, "-m", "sft.zero3", "--model_name_or_path", "tiny", "--write", str(zero3)],
                       cwd=REPO_ROOT, env=run_env(), check=True, capture_output=True)
        launch += ["--config_file", "config/accelerate/zero3.yaml", "--deepspeed_config_file", str(zero3)]
    return launch + [str(shim), "train.py", *SHORT_RUN, "--per_device_train_batch_size", "1", *flags]


def run(command: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=REPO_ROOT, env=run_env(), capture_output=True, text=True)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done


def losses(output_dir: Path) -> dict[int, float]:
    """{step: loss} from the newest checkpoint's trainer_state.json (holds the whole history, resumed runs too)."""
    newest = max(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    history = json.loads((newest / "trainer_state.json").read_text())["log_history"]
    return {h["step"]: h["loss"] for h in history if "loss" in h}


def assert_same_losses(actual: dict[int, float], expected: dict[int, float]) -> None:
    assert sorted(actual) == sorted(expected)
    for step in expected:
        assert abs(actual[step] - expected[step]) <= LOSS_ATOL, (step, actual[step], expected[step])


@pytest.fixture(scope="module")
def initial_weights(tmp_path_factory) -> Path:
    """The tiny preset's random init, saved once, so every backend starts from the same fp32 weights."""
    path = tmp_path_factory.mktemp("init")
    script = (f"import torch\nfrom sft.model import load_model, load_tokenizer\n"
              f"load_model('tiny', dtype=torch.float32, seed=0).save_pretrained({str(path)!r})\n"
              f"load_tokenizer('tiny').save_pretrained({str(path)!r})\n")
    subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=run_env(), check=True, capture_output=True)
    return path


@pytest.fixture(scope="module")
def runs(initial_weights, tmp_path_factory) -> dict:
    """4 steps from the same weights: one process with 2 rows per step; FSDP2 and ZeRO-3 with 1 row per rank."""
    out = {}
    common = ["--model_name_or_path", str(initial_weights), "--max_steps", "4"]
    for name in ("single", "fsdp", "zero3"):
        workdir = tmp_path_factory.mktemp(name)
        flags = [*common, "--output_dir", str(workdir / "out")]
        command = single_command(*flags, "--per_device_train_batch_size", "2") if name == "single" \
            else distributed_command(name, workdir, *flags)
        done = run(command)
        out[name] = {"dir": workdir / "out", "log": done.stdout + done.stderr}
    return out


COUNTING_SHIM = '''"""Test-only: count the experts' forward runs with autograd on (the first run and any recompute)."""
import atexit, os, runpy, sys
import torch
sys.path.insert(0, os.getcwd())  # the repository: the test runs the launch from its root
import monkey_patch.scattermoe.experts as experts
runs, real = [0], experts.torch_experts  # the experts' CPU path, looked up per call
def counted(*args):
    runs[0] += torch.is_grad_enabled()
    return real(*args)
experts.torch_experts = counted
atexit.register(lambda: print(f"experts forward runs on rank {os.environ.get('RANK')}: {runs[0]}", flush=True))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


@pytest.mark.parametrize("backend", ["fsdp", "zero3"])
def test_sharded_runs_keep_experts_activations(runs, initial_weights, tmp_path, backend):
    """--recompute_experts false under FSDP2 (its own activation checkpointing, no recompute context of ours) and
    ZeRO-3 (transformers' gradient checkpointing with our context): the experts run once per MoE layer and step on
    each rank, where recomputing runs them twice (measured: 16 runs per rank with --recompute_experts true), and the
    losses are those of one process (which did not checkpoint at all)."""
    counting = tmp_path / "count_experts.py"
    counting.write_text(COUNTING_SHIM)
    command = distributed_command(backend, tmp_path, "--model_name_or_path", str(initial_weights),
                                  "--max_steps", "4", "--output_dir", str(tmp_path / "out"),
                                  "--gradient_checkpointing", "true",
                                  "--gradient_checkpointing_kwargs", '{"use_reentrant": false}',
                                  "--recompute_experts", "false")
    at = command.index(str(tmp_path / "cpu_shim.py"))
    done = run(command[:at] + [str(counting)] + command[at:])
    log = done.stdout + done.stderr
    assert "recompute_experts=False (--recompute_experts false)" in log
    moe_layers = 2  # the tiny preset's
    assert sorted(re.findall(r"experts forward runs on rank \d: (\d+)", log)) == [str(4 * moe_layers)] * 2, log[-2000:]
    assert_same_losses(losses(tmp_path / "out"), losses(runs["single"]["dir"]))


@pytest.mark.parametrize("backend", ["fsdp", "zero3"])
def test_same_losses_as_one_process(runs, backend):
    assert_same_losses(losses(runs[backend]["dir"]), losses(runs["single"]["dir"]))


def test_intermediate_checkpoints_are_sharded(runs):
    fsdp_checkpoint = runs["fsdp"]["dir"] / "checkpoint-2"
    assert (fsdp_checkpoint / "pytorch_model_fsdp_0").is_dir() and (fsdp_checkpoint / "optimizer_0").is_dir()
    assert not (fsdp_checkpoint / "model.safetensors").exists()  # SHARDED_STATE_DICT: no gathered copy per save
    zero3_checkpoint = runs["zero3"]["dir"] / "checkpoint-2"
    shards = list((zero3_checkpoint / "global_step2").glob("*optim_states.pt"))
    assert len(shards) == 2, shards  # one optimizer shard per rank


def test_deepspeed_agrees_with_our_granularity_table(runs):
    """sft.zero3 reproduces DeepSpeed's own granularity rule: DeepSpeed names the same smallest module and value."""
    sys.path.insert(0, str(REPO_ROOT))
    from sft.zero3 import granularities, meta_model
    model = meta_model("tiny")
    rated = granularities(model)
    name = min(rated, key=rated.get)
    found = re.search(r"smallest module granularity is \[(\w+):(\d+)\]", runs["zero3"]["log"])
    assert found, "DeepSpeed did not log the granularity warning (threshold should sit just below the smallest)"
    assert (found.group(1), int(found.group(2))) == (type(model.get_submodule(name)).__name__, rated[name])


def test_final_checkpoints_are_consolidated_and_load_in_stock_transformers(runs, tmp_path):
    """One model.safetensors in the per-expert layout per backend; stock transformers loads it (none of our code
    imported) and its weights equal the one-process run's."""
    dirs = [str(runs[name]["dir"]) for name in ("single", "fsdp", "zero3")]
    script = f"""
import sys, torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
assert not any("monkey_patch" in m or m.startswith("sft") for m in sys.modules)
reference, *others = {dirs!r}
expected = AutoModelForCausalLM.from_pretrained(reference).state_dict()
for path in others:
    keys = load_file(path + "/model.safetensors").keys()
    assert "model.layers.0.mlp.experts.0.gate_proj.weight" in keys and not any("gate_up_proj" in k for k in keys)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.dtype == torch.float32
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[key], atol={WEIGHT_ATOL}, rtol=0, msg=lambda m: path + key + m)
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()
print("ok", len(others))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          env={"HF_HUB_OFFLINE": "1", "TORCHAO_FORCE_SKIP_LOADING_SO_FILES": "1", "PATH": "/usr/bin"})
    assert done.returncode == 0 and "ok 2" in done.stdout, done.stderr[-3000:]
    for name in ("fsdp", "zero3"):
        assert len(list(runs[name]["dir"].glob("*.safetensors"))) == 1  # one file, not shards

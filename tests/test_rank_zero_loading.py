"""FSDP with `cpu_ram_efficient_loading`: the ranks that receive rank 0's weights build placeholders that take no host
memory (sft/model.py, placeholder_model).

That training is unchanged by it: tests/test_distributed.py's fp32 FSDP2 run (rank 1 builds placeholders there, its
losses match one process within 1e-4), and below, the same with bf16 mixed precision, where accelerate upcasts rank
0's bf16 weights to fp32 and rank 1's placeholders are fp32 already. Then one process that takes the part of local
rank 1 (a gloo group of one, LOCAL_RANK=1, accelerate's FSDP environment): what it builds, and how much host memory
that costs.
"""
import json
import os
import socket
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT
from tests.test_distributed import distributed_command, initial_weights, losses, run, single_command  # noqa: F401

BUILD = """
import json, torch, torch.distributed as dist
from sft.model import load_model, weights_come_from_rank_zero

def rss_mib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024

dist.init_process_group("gloo", rank=0, world_size=1)
overrides = {"hidden_size": 512}  # lm_head and embeddings: 2 x 151936 x 512 fp32 = 622 MB if they were written
before = rss_mib()
model = load_model("tiny", dtype=torch.bfloat16, config_overrides=overrides, upcast_by_accelerate=%(upcast)s)
grown = rss_mib() - before
stock = load_model("tiny", dtype=torch.bfloat16, config_overrides=overrides)  # what rank 0 builds
params = list(model.parameters())
print(json.dumps({
    "placeholders": weights_come_from_rank_zero(),
    "grown_mib": grown,
    "weights_mib": sum(p.numel() * p.element_size() for p in params) / 2**20,
    "dtypes": sorted({str(p.dtype) for p in params}),
    "devices": sorted({p.device.type for p in params}),
    "distinct_data_ptrs": len({p.data_ptr() for p in params}) == len(params) and 0 not in {p.data_ptr() for p in params},
    "names": [n for n, _ in model.named_parameters()] == [n for n, _ in stock.named_parameters()],
    "shapes": all(a.shape == b.shape for a, b in zip(params, stock.parameters())),
    "buffers": all(torch.equal(a, b) for a, b in zip(model.buffers(), stock.buffers())),
    "trainable": all(p.requires_grad for p in params),
}))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_as_local_rank_1(upcast: bool, fsdp: bool = True) -> dict:
    env = dict(os.environ, LOCAL_RANK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               ACCELERATE_USE_FSDP=str(fsdp).lower(), FSDP_CPU_RAM_EFFICIENT_LOADING="true",
               PYTHONPATH=str(REPO_ROOT))
    done = subprocess.run([sys.executable, "-c", BUILD % {"upcast": upcast}], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads resident memory from /proc (Linux)")
@pytest.mark.parametrize("upcast", [True, False], ids=["mixed-precision", "no-upcast"])
def test_placeholders_take_no_host_memory(upcast):
    """fp32 placeholders under mixed precision (accelerate upcasts rank 0's weights to fp32, and would upcast bf16
    placeholders by writing them); the model's own dtype otherwise, so every rank shards the same dtype."""
    built = build_as_local_rank_1(upcast)
    assert built["placeholders"]
    assert built["dtypes"] == (["torch.float32"] if upcast else ["torch.bfloat16"]) and built["devices"] == ["cpu"]
    assert built["weights_mib"] > (550 if upcast else 275), built  # 2 x 151936 x 512 parameters and the layers
    assert built["grown_mib"] < 60, built  # measured ~10 MiB; zeros_like would add the weights_mib
    assert built["distinct_data_ptrs"], "accelerate re-points the optimizer by data_ptr: placeholders need their own"
    assert built["names"] and built["shapes"] and built["trainable"]
    assert built["buffers"], "accelerate keeps this rank's non-persistent buffers (RoPE inv_freq): they must be real"


def test_without_fsdp_every_rank_builds_its_weights():
    built = build_as_local_rank_1(upcast=True, fsdp=False)
    assert not built["placeholders"] and built["dtypes"] == ["torch.bfloat16"]
    assert built["grown_mib"] > 250  # the drawn weights are written: the measurement sees them


def test_mixed_precision_fsdp_trains_as_one_process(initial_weights, tmp_path):
    """bf16 weights, `--bf16` autocast on CPU (`--use_cpu`), 4 steps: FSDP2 on 2 processes against one process with
    the same global batch. Measured: losses within 7e-3 (bf16 matmuls, reduced in another order); a rank training on
    its own unbroadcast weights, or on another dtype, would not come close."""
    common = ["--model_name_or_path", str(initial_weights), "--max_steps", "4", "--bf16", "true", "--use_cpu", "true",
              "--model_dtype", "bfloat16"]
    single, fsdp = tmp_path / "single", tmp_path / "fsdp"
    run(single_command(*common, "--output_dir", str(single), "--per_device_train_batch_size", "2"))
    fsdp.mkdir()
    run(distributed_command("fsdp", fsdp, *common, "--output_dir", str(fsdp / "out")))
    expected, actual = losses(single), losses(fsdp / "out")
    assert sorted(actual) == sorted(expected)
    assert all(abs(actual[step] - expected[step]) < 1e-2 for step in expected), (actual, expected)

"""apply_patches on CPU: what it chooses, that it is idempotent, that parameters keep their stock names; and where
presets initialise."""
import pytest
import torch

from monkey_patch import apply_patches, resolve_compile_layers
from monkey_patch.errors import PatchError
from sft.model import load_model


@pytest.fixture
def model():
    return load_model("tiny", dtype=torch.float32)


def test_cpu_defaults_are_our_kernel_without_liger(model):
    keys = list(model.state_dict())
    applied = apply_patches(model, device="cpu")
    assert applied == {"moe_kernel": "scattermoe", "liger": False, "attn_implementation": "sdpa",
                       "compile_layers": False, "recompute_experts": True}
    assert model.config._experts_implementation == "scattermoe"
    assert apply_patches(model, device="cpu") == applied and list(model.state_dict()) == keys


def test_compile_layers_follows_fp8_unless_asked(model):
    assert resolve_compile_layers("auto", fp8=True) and not resolve_compile_layers("auto", fp8=False)
    assert resolve_compile_layers("true", fp8=False)
    apply_patches(model, device="cpu", compile_layers="true")
    assert all(layer._compiled_call_impl is not None for layer in model.model.layers)  # compiled lazily


@pytest.mark.parametrize("sharding", ["fsdp", "deepspeed"])
def test_no_compiled_layers_under_a_sharding_backend(sharding):
    assert not resolve_compile_layers("auto", fp8=True, sharding=sharding)
    with pytest.raises(PatchError, match=f"--compile_layers true fails under {sharding}"):
        resolve_compile_layers("true", fp8=False, sharding=sharding)


@pytest.mark.parametrize("fp8_experts, experts", [(True, "scattermoe_fp8"), (False, "scattermoe")])
def test_fp8_switches_our_experts_to_their_fp8_kernel(monkeypatch, fp8_experts, experts):
    import monkey_patch.fp8 as fp8

    model = load_model("tiny", dtype=torch.float32, config_overrides={"num_hidden_layers": 4})
    monkeypatch.setattr(fp8, "check_fp8_device", lambda: None)  # conversion only: nothing runs here
    applied = apply_patches(model, device="cpu", fp8=True, fp8_experts=fp8_experts, compile_layers="false")
    assert applied["fp8_experts"] is fp8_experts and model.config._experts_implementation == experts
    assert applied["fp8"]["converted"] == 4 * 2  # q/k/v/o of the two inner layers


@pytest.mark.parametrize("flags, message", [
    ({"moe_kernel": "fast"}, "--moe_kernel 'fast'"),
    ({"liger": "true"}, "--liger true needs a CUDA GPU"),
    ({"moe_kernel": "liger"}, "--moe_kernel liger needs a CUDA GPU"),
    ({"compile_layers": "maybe"}, "--compile_layers 'maybe'"),
    ({"ce_chunk_tokens": -1}, "--ce_chunk_tokens -1: a token count"),
    ({"fp8": True}, "compute capability 8.9 or newer"),
])
def test_setups_this_machine_cannot_run_are_named(model, flags, message):
    if torch.cuda.is_available():
        pytest.skip("checks the errors of a machine without a GPU")
    with pytest.raises(PatchError, match=message):
        apply_patches(model, device="cpu", **flags)


def test_presets_draw_their_weights_on_the_requested_device():
    """train.py draws a preset's random weights on its GPU (seconds for 30B parameters, minutes on a CPU)."""
    assert all(p.device.type == "meta" for p in load_model("tiny", init_device="meta").parameters())
    here, there = load_model("tiny", seed=3), load_model("tiny", seed=3, init_device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(here.state_dict().values(), there.state_dict().values()))

"""apply_patches on CPU: what it chooses, that it is idempotent, and that parameters keep their stock names."""
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
                       "compile_layers": False}
    assert model.config._experts_implementation == "scattermoe"
    assert apply_patches(model, device="cpu") == applied and list(model.state_dict()) == keys


def test_compile_layers_follows_fp8_unless_asked(model):
    assert resolve_compile_layers("auto", fp8=True) and not resolve_compile_layers("auto", fp8=False)
    assert resolve_compile_layers("true", fp8=False)
    apply_patches(model, device="cpu", compile_layers="true")
    assert all(layer._compiled_call_impl is not None for layer in model.model.layers)  # compiled lazily


@pytest.mark.parametrize("flags, message", [
    ({"moe_kernel": "fast"}, "--moe_kernel 'fast'"),
    ({"liger": "true"}, "--liger true needs a CUDA GPU"),
    ({"moe_kernel": "liger"}, "--moe_kernel liger needs a CUDA GPU"),
    ({"compile_layers": "maybe"}, "--compile_layers 'maybe'"),
    ({"fp8": True}, "compute capability 8.9 or newer"),
])
def test_setups_this_machine_cannot_run_are_named(model, flags, message):
    if torch.cuda.is_available():
        pytest.skip("checks the errors of a machine without a GPU")
    with pytest.raises(PatchError, match=message):
        apply_patches(model, device="cpu", **flags)

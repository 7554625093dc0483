"""Selective FP8: exactly which modules of Qwen3-30B-A3B train in FP8, and the conversion itself (emulated on CPU)."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from monkey_patch.errors import PatchError
from monkey_patch.fp8 import apply_fp8, check_fp8_device, fp8_module_names, should_convert
from sft.model import load_model, preset_config


def test_exactly_the_inner_attention_projections_of_qwen3_30b_a3b():
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(preset_config("qwen3-30b-a3b"))
    expected = [f"model.layers.{i}.self_attn.{p}_proj" for i in range(1, 47) for p in ("q", "k", "v", "o")]
    assert fp8_module_names(model) == expected  # 184 linears; layers 0 and 47, routers, lm_head stay bf16


@pytest.mark.parametrize("fqn, features, expected", [
    ("model.layers.3.self_attn.q_proj", (2048, 4096), True),
    ("model.layers.0.self_attn.q_proj", (2048, 4096), False),   # first layer
    ("model.layers.47.self_attn.o_proj", (4096, 2048), False),  # last layer
    ("model.layers.3.mlp.gate", (2048, 128), False),            # a router, were it an nn.Linear
    ("lm_head", (2048, 151936), False),
    ("model.layers.3.self_attn.k_proj", (2048, 520), False),    # 520 is not a multiple of 16
])
def test_filter(fqn, features, expected):
    assert should_convert(torch.nn.Linear(*features, device="meta"), fqn, num_layers=48) is expected


def test_emulated_conversion_trains_and_is_idempotent():
    model = load_model("tiny", dtype=torch.bfloat16, config_overrides={"num_hidden_layers": 4})
    assert apply_fp8(model, emulate=True)["converted"] == 8
    assert type(model.model.layers[1].self_attn.q_proj).__name__ == "Float8Linear"
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    ids = torch.randint(0, 1000, (1, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    assert model.model.layers[1].self_attn.q_proj.weight.grad is not None
    assert apply_fp8(model, emulate=True)["converted"] == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_clear_error_without_a_capable_gpu():
    with pytest.raises(PatchError, match="compute capability 8.9 or newer"):
        check_fp8_device()

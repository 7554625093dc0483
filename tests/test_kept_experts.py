"""--recompute_experts false (monkey_patch/kept_experts.py): under gradient checkpointing the experts run once per
layer and step, the rest of each layer is still recomputed, and the gradients are those of full recomputation;
`auto` keeps the activations only where the step's peak cannot rise."""
import pytest
import torch

import monkey_patch.scattermoe.experts as experts_module
from monkey_patch import apply_patches
from monkey_patch.errors import PatchError
from sft.model import load_model

CHECKPOINTED = {"use_reentrant": False}


def tiny(recompute_experts=True, checkpointing=True, **patches):
    model = load_model("tiny", dtype=torch.float32, seed=0)
    apply_patches(model, device="cpu", moe_kernel="scattermoe", attn_implementation="sdpa",
                  recompute_experts=recompute_experts, **patches)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=CHECKPOINTED)
    return model.train()


def count_experts_calls(monkeypatch):
    calls = []
    real = experts_module.torch_experts  # the experts' CPU path (scattermoe_experts_forward looks it up per call)

    def counted(*args):
        calls.append(torch.is_grad_enabled())
        return real(*args)
    monkeypatch.setattr(experts_module, "torch_experts", counted)
    return calls


def loss_and_grads(model):
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_experts_run_once_per_layer_and_gradients_match_full_recompute(monkeypatch):
    calls = count_experts_calls(monkeypatch)
    full = loss_and_grads(tiny(recompute_experts=True))
    layers = len(calls) // 2
    assert layers > 0 and len(calls) == 2 * layers  # full recompute: forward + recompute
    calls.clear()
    kept = loss_and_grads(tiny(recompute_experts=False))
    assert len(calls) == layers  # kept: the forward only
    torch.testing.assert_close(kept[0], full[0], rtol=0, atol=0)
    assert kept[1].keys() == full[1].keys()
    for name, grad in full[1].items():  # same math, same order: fp32 on a CPU agrees to rounding
        torch.testing.assert_close(kept[1][name], grad, rtol=1e-5, atol=1e-6, msg=name)
    assert kept[1]["model.layers.0.mlp.experts.gate_up_proj"].abs().sum() > 0


def test_without_checkpointing_the_flag_changes_nothing(monkeypatch):
    calls = count_experts_calls(monkeypatch)
    plain = loss_and_grads(tiny(checkpointing=False))
    kept = loss_and_grads(tiny(recompute_experts=False, checkpointing=False))
    for name, grad in plain[1].items():
        torch.testing.assert_close(kept[1][name], grad, rtol=0, atol=0, msg=name)
    assert len(calls) == 2 * len(tiny().model.layers)  # one forward per layer in each of the two runs


def test_a_second_backward_through_kept_activations_is_named():
    model = tiny(recompute_experts=False, checkpointing=False)
    ids = torch.randint(0, 1000, (1, 8))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="--recompute_experts true"):
        loss.backward()


@pytest.mark.parametrize("patches,match", [
    (dict(moe_kernel="grouped_mm"), "our experts kernel"),
    (dict(compile_layers="true"), "uncompiled layers"),
])
def test_unsupported_combinations_are_refused(patches, match):
    model = load_model("tiny", dtype=torch.float32, seed=0)
    with pytest.raises(PatchError, match=match):
        apply_patches(model, device="cpu", attn_implementation="sdpa", recompute_experts=False,
                      **{"moe_kernel": "scattermoe", **patches})


def test_reentrant_checkpointing_is_refused():
    model = tiny(recompute_experts=False, checkpointing=False)
    with pytest.raises(PatchError, match="use_reentrant"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})


# ---- --recompute_experts auto -------------------------------------------------------------------------------------

def test_kept_bytes_at_qwen3_30b_a3b_shapes():
    """h [8 rows per token, 2 x 768] and aw [8, 768] in bf16: 0.28 GiB per layer per 8K tokens (the help text's)."""
    from monkey_patch.kept_experts import kept_bytes
    from sft.model import preset_config

    config = preset_config("qwen3-30b-a3b", num_hidden_layers=8)
    assert kept_bytes(config, 8192, torch.bfloat16) == 8 * 8192 * 8 * 3 * 768 * 2
    assert kept_bytes(config, 8192, torch.bfloat16) / 8 / 2**30 == pytest.approx(0.281, abs=1e-3)
    assert kept_bytes(preset_config("qwen3-30b-a3b", num_hidden_layers=8, mlp_only_layers=[0, 1]), 8192,
                      torch.bfloat16) == 6 * 8192 * 8 * 3 * 768 * 2  # dense layers keep nothing


@pytest.mark.parametrize("tokens, sharding, moe_kernel, keep", [
    (256, None, "scattermoe", True),  # the kept activations are a small part of the gradients
    (10**7, None, "scattermoe", False),  # more than half the gradients: the peak could rise
    (256, "fsdp", "scattermoe", False),  # sharded gradients, and keeping is unverified there
    (256, None, "grouped_mm", False),  # keeping is our kernel's
])
def test_auto_keeps_only_where_the_peak_cannot_rise(tokens, sharding, moe_kernel, keep):
    from monkey_patch.kept_experts import choose_recompute_experts, kept_bytes

    model = load_model("tiny", dtype=torch.float32, seed=0)
    recompute, why = choose_recompute_experts("auto", model, moe_kernel, False, sharding, tokens)
    assert recompute is not keep, why
    gradients = sum(p.numel() * 4 for p in model.parameters())
    if sharding is None and moe_kernel == "scattermoe":  # the rule itself, from the two sizes
        assert keep == (2 * kept_bytes(model.config, tokens, torch.float32) <= gradients), why


def test_explicit_choices_and_bad_values():
    from monkey_patch.kept_experts import choose_recompute_experts

    model = load_model("tiny", dtype=torch.float32, seed=0)
    assert choose_recompute_experts("true", model, "scattermoe", False, None, 256)[0] is True
    assert choose_recompute_experts("false", model, "scattermoe", False, None, 256)[0] is False
    assert choose_recompute_experts("false", model, "scattermoe", False, "deepspeed", 256)[0] is False
    assert choose_recompute_experts("false", model, "scattermoe", False, "fsdp", 256)[0] is False
    with pytest.raises(PatchError, match="choose auto, true or false"):
        choose_recompute_experts("sometimes", model, "scattermoe", False, None, 256)
    with pytest.raises(PatchError, match="tokens_per_micro_batch"):
        apply_patches(model, device="cpu", attn_implementation="sdpa", recompute_experts="auto")


def test_auto_through_apply_patches_keeps_and_trains_like_recompute():
    """What train.py runs by default on one device: auto keeps the tiny model's experts activations (tiny next to its
    gradients), and the gradients are those of full recomputation."""
    full = loss_and_grads(tiny(recompute_experts=True))
    model = load_model("tiny", dtype=torch.float32, seed=0)
    applied = apply_patches(model, device="cpu", moe_kernel="scattermoe", attn_implementation="sdpa",
                            recompute_experts="auto", tokens_per_micro_batch=256)
    assert applied["recompute_experts"] is False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=CHECKPOINTED)
    kept = loss_and_grads(model.train())
    torch.testing.assert_close(kept[0], full[0])
    for name in full[1]:
        torch.testing.assert_close(kept[1][name], full[1][name], rtol=1e-5, atol=1e-6, msg=name)

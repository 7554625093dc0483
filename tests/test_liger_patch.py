"""apply_liger: what it swaps, that it swaps only the given instance, and that loss = CE + coef * load-balancing aux.

CPU: the wiring (no kernel runs), the aux loss through Liger's own lce_forward on its logits path (eval mode, plain
torch CE), and Liger's real RoPE + fused-linear-CE Triton kernels under TRITON_INTERPRET=1 in a subprocess (its
RMSNorm and LigerExperts kernels do not run in the interpreter). GPU (skipped on CPU): every kernel, every flag.
"""
import functools
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, Qwen3MoeConfig
from transformers.models.qwen3_moe import modeling_qwen3_moe as mod

from monkey_patch.liger import apply_liger, liger_chunk_mem_const, liger_flags

ROOT = Path(__file__).resolve().parent.parent
COEF = 0.5  # large, so that a dropped or doubled aux term moves the loss far beyond tolerance


def config(**overrides):
    fields = dict(vocab_size=256, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
                  use_cache=False, output_router_logits=True, router_aux_loss_coef=COEF)
    return Qwen3MoeConfig(**{**fields, **overrides})


def build(seed=0, device="cpu", **overrides):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config(**overrides), dtype=torch.float32, attn_implementation="eager",
                                            experts_implementation="eager").to(device)


@pytest.fixture(autouse=True)
def stock_module(monkeypatch):
    """Liger's rope swap is process-wide: put the module's attributes back after each test."""
    from liger_kernel.transformers.model import qwen3_moe as liger_qwen3_moe

    for name in ("apply_rotary_pos_emb", "Qwen3MoeRMSNorm", "Qwen3MoeExperts"):
        monkeypatch.setattr(mod, name, getattr(mod, name))
    monkeypatch.setattr(mod.Qwen3MoeForCausalLM, "forward", mod.Qwen3MoeForCausalLM.forward)
    monkeypatch.setattr(liger_qwen3_moe, "LigerForCausalLMLoss", liger_qwen3_moe.LigerForCausalLMLoss)  # ce chunks


def hand_loss(logits, labels, router_logits, top_k, num_experts, mask=None):
    """CE on shifted labels + COEF * Switch load balancing over all layers' router logits concatenated:
    E * sum_e (share of top-k assignments to e) * (mean router probability of e), padding rows left out."""
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
    probs = torch.cat(router_logits).float().softmax(-1)  # [layers * tokens, E]
    keep = torch.ones(probs.shape[0]) if mask is None else mask.reshape(-1).float().repeat(len(router_logits))
    chosen = F.one_hot(probs.topk(top_k, -1).indices, num_experts).sum(1).float()  # [rows, E]
    share = (chosen * keep[:, None]).sum(0) / keep.sum()
    mean_prob = (probs * keep[:, None]).sum(0) / keep.sum()
    return ce + COEF * num_experts * (share * mean_prob).sum()


# ---- wiring (CPU, no kernel runs) ------------------------------------------------------------------------------

@pytest.mark.parametrize("flags", [dict(), dict(rope=False, rms_norm=False), dict(fused_linear_cross_entropy=False),
                                   dict(experts=True)], ids=["default", "flce-only", "no-flce", "experts"])
def test_wiring(flags):
    from liger_kernel.transformers.model.qwen3_moe import lce_forward
    from liger_kernel.transformers.rms_norm import LigerRMSNorm
    from liger_kernel.transformers.rope import liger_rotary_pos_emb
    from liger_kernel.transformers.swiglu import LigerExperts

    stock_rms, stock_experts = mod.Qwen3MoeRMSNorm, mod.Qwen3MoeExperts
    model = build()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    apply_liger(model, **flags)
    on = {**dict(rope=True, rms_norm=True, fused_linear_cross_entropy=True, experts=False, ce_chunk_tokens=None),
          **flags}
    assert liger_flags(model) == on

    def bound(module, fn):
        return getattr(module.__dict__.get("forward"), "__func__", None) is fn
    assert bound(model, lce_forward) == on["fused_linear_cross_entropy"]
    norms = [m for m in model.modules() if isinstance(m, stock_rms)]
    assert len(norms) == 1 + 4 * model.config.num_hidden_layers  # final norm; input, post-attn, q_norm, k_norm
    assert all(bound(m, LigerRMSNorm.forward) == on["rms_norm"] for m in norms)
    assert all(bound(layer.mlp.experts, LigerExperts.forward) == on["experts"] for layer in model.model.layers)
    assert (mod.apply_rotary_pos_emb is liger_rotary_pos_emb) == on["rope"]  # the name attention's forward calls
    # only this instance changed: the classes are stock, and a model built now has no instance patches
    assert mod.Qwen3MoeRMSNorm is stock_rms and mod.Qwen3MoeExperts is stock_experts
    later = build()
    assert "forward" not in later.__dict__ and not any("forward" in m.__dict__ for m in later.modules())
    # parameters untouched: same keys, same values (checkpoints stay stock)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_idempotent_and_irreversible():
    model = build()
    apply_liger(model)
    forwards = [m.__dict__.get("forward") for m in model.modules()]
    apply_liger(model)
    assert [m.__dict__.get("forward") for m in model.modules()] == forwards
    with pytest.raises(ValueError, match="reload the model"):
        apply_liger(model, experts=True)


def test_unsupported_setups_raise_with_a_fix():
    with pytest.raises(ValueError, match="use experts=False"):
        apply_liger(build(mlp_only_layers=[1]), experts=True)
    model = build()
    model.config._experts_implementation = "scattermoe"
    with pytest.raises(ValueError, match="silently replace"):
        apply_liger(model, experts=True)
    with pytest.raises(TypeError, match="Qwen3MoeForCausalLM"):
        apply_liger(model.model)


# ---- fused-CE chunk size (CPU: Liger's chunk rule, and what reaches its loss) ------------------------------------

def liger_chunk_tokens(tokens, vocab, hidden, const):
    """Liger 0.8.5's chunk size (ops/fused_linear_cross_entropy.py), written out independently."""
    inc = -(-vocab // (const * hidden))
    return min(2 ** math.ceil(math.log2(-(-tokens // inc))), tokens)


@pytest.mark.parametrize("tokens,vocab,hidden,want", [(8192, 151936, 2048, 2048), (32768, 151936, 2048, 2048),
                                                      (8192, 151936, 4096, 2048), (1000, 151936, 2048, 1000),
                                                      (48, 256, 32, 32)])
def test_chunk_budget_gives_the_asked_chunk(tokens, vocab, hidden, want):
    const = liger_chunk_mem_const(tokens, vocab, hidden, chunk_tokens=2048 if vocab > 256 else 32)
    assert liger_chunk_tokens(tokens, vocab, hidden, const) == want
    assert const == 1 or liger_chunk_tokens(tokens, vocab, hidden, const - 1) < want  # the smallest such budget


@pytest.mark.parametrize("chunk", [None, 32])
def test_chunk_budget_reaches_liger_loss(monkeypatch, chunk):
    """Training mode on the CPU, Liger's fused-CE function replaced by a plain-torch spy: the loss stays the stock
    model's, and chunk_mem_const arrives as computed (absent: Liger's default) through Liger's own lce_forward."""
    import liger_kernel.transformers.functional as liger_functional

    real, seen = liger_functional.liger_fused_linear_cross_entropy, []

    @functools.wraps(real)  # LigerForCausalLMLoss filters its kwargs by this signature
    def spy(input, weight, target, reduction="mean", ignore_index=-100, chunk_mem_const=1, **kwargs):
        seen.append(chunk_mem_const)
        return F.cross_entropy(input @ weight.t(), target, ignore_index=ignore_index, reduction=reduction)

    monkeypatch.setattr(liger_functional, "liger_fused_linear_cross_entropy", spy)
    stock, patched = build(), build()
    apply_liger(patched, rope=False, rms_norm=False, ce_chunk_tokens=chunk)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    out, ref = patched(input_ids=ids, labels=ids), stock(input_ids=ids, labels=ids)
    torch.testing.assert_close(out.loss, ref.loss)
    assert seen == [1 if chunk is None else 4]  # 48 tokens, V=256, H=32: budget 4 gives 32-token chunks


def test_chunk_size_is_one_per_process():
    apply_liger(build(), rope=False, rms_norm=False, ce_chunk_tokens=32)
    apply_liger(build(), rope=False, rms_norm=False, ce_chunk_tokens=32)  # the same size again: fine
    with pytest.raises(ValueError, match="process-wide"):
        apply_liger(build(), rope=False, rms_norm=False, ce_chunk_tokens=64)
    with pytest.raises(ValueError, match="needs fused_linear_cross_entropy"):
        apply_liger(build(), fused_linear_cross_entropy=False, ce_chunk_tokens=32)


# ---- aux loss through Liger's forward (CPU: its logits path, plain torch CE) ------------------------------------

@pytest.mark.parametrize("padded", [False, True], ids=["no-padding", "padding"])
def test_aux_loss_added_with_liger_forward(padded):
    stock, patched = build(), build()
    apply_liger(patched, rope=False, rms_norm=False)  # lce_forward only: no Triton kernel on this path
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1] * 12, [1] * 8 + [0] * 4]) if padded else None
    labels = ids if mask is None else ids.masked_fill(mask == 0, -100)
    stock.eval(), patched.eval()  # eval: lce_forward materialises logits and uses transformers' CE
    with torch.no_grad():
        ref = stock(input_ids=ids, attention_mask=mask, labels=labels)
        out = patched(input_ids=ids, attention_mask=mask, labels=labels)
        no_aux = patched(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=False)
    want = hand_loss(ref.logits, labels, ref.router_logits, 2, 4, mask)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.loss, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.aux_loss, ref.aux_loss)
    torch.testing.assert_close(out.loss - no_aux.loss, COEF * ref.aux_loss, atol=1e-5, rtol=1e-5)
    assert ref.aux_loss > 0.5  # ~1 for a random router: the term is far from negligible at COEF=0.5


# ---- Liger's real kernels ----------------------------------------------------------------------------------------

COMPARE = textwrap.dedent("""
    import json, sys, torch
    sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
    from test_liger_patch import build
    from monkey_patch.liger import apply_liger
    device, flags = {device!r}, {flags!r}
    torch.backends.cuda.matmul.allow_tf32 = False
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0)).to(device)
    res = []
    for patch in (False, True):
        model = build(device=device)
        if patch:
            apply_liger(model, **flags)
        out = model(input_ids=ids, labels=ids)  # training mode: Liger's fused linear CE, no logits
        out.loss.backward()
        res.append((out.loss.item(), out.aux_loss.item(), out.logits is None,
                    {{n: p.grad for n, p in model.named_parameters()}}))
    (l0, a0, _, g0), (l1, a1, no_logits, g1) = res
    rel = max(((g1[n] - g0[n]).norm() / g0[n].norm()).item() for n in g0)
    print(json.dumps(dict(stock=l0, liger=l1, aux_stock=a0, aux_liger=a1, no_logits=no_logits, grad_rel=rel)))
""")


def run_compare(device, flags, env=None):
    code = COMPARE.format(root=str(ROOT), tests=str(ROOT / "tests"), device=device, flags=flags)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_same_loss(r, tol):
    assert r["no_logits"], "fused linear CE should return no logits in training"
    assert r["aux_liger"] > 0.5 and abs(r["aux_liger"] - r["aux_stock"]) <= tol * r["aux_stock"]
    assert abs(r["liger"] - r["stock"]) <= tol * r["stock"], r  # loss includes COEF * aux (~0.5 of ~6)
    assert r["grad_rel"] < 10 * tol, r


@pytest.mark.parametrize("chunk", [None, 32], ids=["liger-chunks", "32-token-chunks"])
def test_real_rope_and_fused_ce_kernels_interpreted_on_cpu(chunk):
    """TRITON_INTERPRET=1 runs the Triton kernels on the CPU (fp32 only; numpy < 2.4). Measured: identical loss,
    gradients within 3e-7 relative. A subprocess, because the interpreter is chosen when triton.jit runs.
    48 tokens: Liger's own sizing makes 6 chunks of 8 tokens, ce_chunk_tokens=32 two chunks."""
    import numpy
    if tuple(int(x) for x in numpy.__version__.split(".")[:2]) >= (2, 4):
        pytest.skip("TRITON_INTERPRET=1 needs numpy < 2.4")
    flags = dict(rms_norm=False, ce_chunk_tokens=chunk)
    check_same_loss(run_compare("cpu", flags, env={"TRITON_INTERPRET": "1"}), 1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Liger's Triton kernels run on CUDA only")
@pytest.mark.parametrize("experts,chunk", [(False, None), (True, None), (False, 32)],
                         ids=["stock-experts", "liger-experts", "32-token-chunks"])
def test_gpu_all_kernels_same_loss_and_aux(experts, chunk):
    """fp32, TF32 off in torch; Liger's kernels may still use TF32 in tl.dot (LigerExperts): 1e-3 relative."""
    check_same_loss(run_compare("cuda", dict(experts=experts, ce_chunk_tokens=chunk)), 1e-3)

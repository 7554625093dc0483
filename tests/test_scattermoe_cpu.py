"""CPU checks of the scattermoe experts: registration, model wiring, state_dict, and the Triton kernels themselves
under TRITON_INTERPRET=1 (fp32 only: the interpreter computes bf16 tl.dot wrongly: measured with triton 3.x).

Shape legend: T tokens, K top_k, E experts, H hidden, I moe intermediate.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from tests.reference import interpreter_only, experts_reference, random_problem, rel_err  # noqa: E402


def _tiny(impl, **overrides):
    from transformers import AutoModelForCausalLM
    from sft.model import preset_config
    import monkey_patch.scattermoe  # noqa: F401  (registers "scattermoe")
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(preset_config("tiny", use_cache=False, **overrides), dtype=torch.float32,
                                            experts_implementation=impl)


def test_registration():
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    from monkey_patch.scattermoe import scattermoe_experts_forward
    assert ALL_EXPERTS_FUNCTIONS["scattermoe"].__wrapped__ is scattermoe_experts_forward  # kept_experts wrapper
    model = _tiny("scattermoe")
    assert model.config._experts_implementation == "scattermoe"
    model.set_experts_implementation("eager")
    assert model.config._experts_implementation == "eager"
    model.set_experts_implementation("scattermoe")
    assert model.config._experts_implementation == "scattermoe"


def test_state_dict_keys_match_stock():
    ours, stock = _tiny("scattermoe").state_dict(), _tiny("eager").state_dict()
    assert list(ours) == list(stock)
    assert all(ours[k].shape == stock[k].shape for k in stock)


def test_tiny_model_logits_and_grads_match_eager():
    ids = torch.randint(0, 5000, (2, 24), generator=torch.Generator().manual_seed(0))
    outs = []
    for impl in ("eager", "scattermoe"):
        model = _tiny(impl)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        outs.append((out.logits, {n: p.grad for n, p in model.named_parameters()}))
    assert rel_err(outs[1][0], outs[0][0]) < 1e-6
    for n, g in outs[0][1].items():
        assert rel_err(outs[1][1][n], g) < 1e-5, n
    assert outs[1][1]["model.layers.0.mlp.gate.weight"].abs().sum() > 0  # router trained through top_k_weights


@pytest.mark.parametrize("T,E,K,H,I", [(1, 4, 4, 8, 6), (30, 16, 2, 12, 10), (9, 5, 1, 8, 6)])
def test_torch_path_matches_reference(T, E, K, H, I):
    from monkey_patch.scattermoe import torch_experts
    x, w1, w2, idx, w = random_problem(T, E, K, H, I, dtype=torch.float64, generator=torch.Generator().manual_seed(T))
    ours = [t.clone().requires_grad_() for t in (x, w1, w2, w)]
    ref = [t.clone().requires_grad_() for t in (x, w1, w2, w)]
    torch_experts(ours[0], ours[1], ours[2], idx, ours[3]).sum().backward()
    experts_reference(ref[0], ref[1], ref[2], idx, ref[3]).sum().backward()
    for a, b in zip(ours, ref):
        assert rel_err(a.grad, b.grad) < 1e-12


_INTERPRET_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from monkey_patch.scattermoe import ops
    from tests.reference import experts_reference, random_problem, rel_err
    import triton
    from monkey_patch.scattermoe import kernels as kn

    class Tuner:
        # Stands in for triton.autotune: runs every config (as its timing runs do, leaving their writes behind),
        # the last one as the pick, and sets best_config as Triton does.
        def __init__(self, fn, configs):
            self.fn, self.configs = fn, [triton.Config(c) for c in configs]

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                for cfg in self.configs:
                    self.best_config = cfg
                    self.fn[grid](*args, **kwargs, **cfg.kwargs)
            return launch

    def use_tuned_path():
        # The autotuned launch path of ops (dw partials sized for the smallest BLOCK_N, sliced to the pick's).
        g = dict(BLOCK_M=16, BLOCK_D=16)
        ops._autotune = lambda: True
        kn.gate_up_tuned = Tuner(kn.gather_matmul, [dict(g, BLOCK_N=32), dict(g, BLOCK_N=16)])
        kn.swiglu_bwd_tuned = Tuner(kn.gather_matmul_variant,
                                    [dict(g, BLOCK_N=16), dict(g, BLOCK_N=32, SWIGLU_LEAN=True)])
        kn.scatter_matmul_tuned = Tuner(kn.scatter_matmul, [dict(g, BLOCK_N=16)])
        kn.expert_wgrad_tuned = Tuner(kn.expert_wgrad, [dict(BLOCK_M=16, BLOCK_N=16, BLOCK_R=16)])

    results = []
    cases, variants = json.loads(sys.argv[1])
    for (name, (T, E, K, H, I), routing), variant in [(c, v) for v in variants for c in cases]:
        if variant == "tuned":
            use_tuned_path()
        else:
            ops._FIXED_GATHER_VARIANT = variant
        name = name + str(variant)
        x, w1, w2, idx, w = random_problem(T, E, K, H, I, generator=torch.Generator().manual_seed(T))
        if routing is not None:
            idx = torch.tensor(routing).expand(T, K).contiguous()
        ours = [t.clone().requires_grad_() for t in (x, w1, w2, w)]
        ref = [t.double().requires_grad_() for t in (x, w1, w2, w)]
        y = ops.scattermoe_experts(ours[0], ours[1], ours[2], idx, ours[3])
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
        y.backward(dy)
        y_ref = experts_reference(ref[0], ref[1], ref[2], idx, ref[3])
        y_ref.backward(dy.double())
        errs = [rel_err(y, y_ref)] + [rel_err(a.grad, b.grad) for a, b in zip(ours, ref)]
        results.append([name, max(errs)])
    print("RESULT" + json.dumps(results))
""")

# Interpreter tiles are 16 x 16 x 16 (ops._FIXED_INTERPRET), so these shapes cross tile edges.
INTERPRET_CASES = [
    ("brief_shape_uneven_dims", (7, 5, 2, 24, 20), None),     # H, I not multiples of 16: masked D and N tails
    ("even_dims", (12, 4, 2, 32, 16), None),                  # EVEN_D fast path
    ("two_experts_take_all", (40, 3, 2, 24, 20), [1, 2]),     # 40 rows per expert: 3 M-tiles each, an empty expert
    ("one_token_topE", (1, 4, 4, 24, 20), None),              # K = E, one row per expert
    ("top1", (9, 7, 1, 40, 36), None),                        # K = 1, E prime
]


# Gather-kernel variants the autotune lists can pick (kernels.py), each run over every case above: the default, the
# lean SwiGLU-backward epilogue, and a BLOCK_N other than the scatter kernel's (sizes the dw partials differently).
# "tuned" (stays last: it patches ops for the rest of the run): ops' autotuned launch path, with a stand-in
# autotuner whose configs differ in BLOCK_N.
GATHER_VARIANTS = [{}, {"SWIGLU_LEAN": True}, {"SWIGLU_LEAN": True, "BLOCK_N": 32}, "tuned"]


def test_every_autotune_variant_switch_is_tested():
    from monkey_patch.scattermoe import kernels

    switches = {key for name in dir(kernels) if name.endswith("_CONFIGS") for config in getattr(kernels, name)
                for key in config.kwargs if not key.startswith("BLOCK")}
    assert "SWIGLU_LEAN" in switches
    assert switches <= {k for v in GATHER_VARIANTS if isinstance(v, dict) for k in v}, switches


@interpreter_only
def test_triton_kernels_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)  # must be set before triton is imported
    proc = subprocess.run([sys.executable, "-c", _INTERPRET_SCRIPT, json.dumps([INTERPRET_CASES, GATHER_VARIANTS])],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.split("RESULT")[-1])
    # fp32 kernels vs fp64 reference: only summation order differs (seen ~2e-7).
    assert all(err < 1e-5 for _, err in results), results


_FREED_SCRIPT = textwrap.dedent("""
    import json, torch
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils.checkpoint import checkpoint
    from monkey_patch.scattermoe import ops
    from tests.reference import random_problem

    made, seen = [], []
    gather, ddown = ops._gather_matmul, ops.experts_bwd_ddown

    def spy_gather(*args, **kwargs):  # every h the forward (and the recompute) makes
        h, aw = gather(*args, **kwargs)
        if kwargs.get("h_S2I") is None:
            made.append(StorageWeakRef(h.untyped_storage()))  # the memory, not the Python object
        return h, aw

    def spy_ddown(*args):
        seen.append([ref.expired() for ref in made])
        return ddown(*args)

    ops._gather_matmul, ops.experts_bwd_ddown = spy_gather, spy_ddown
    x, w1, w2, idx, w = random_problem(12, 4, 2, 32, 16, generator=torch.Generator().manual_seed(0))
    x.requires_grad_()
    y = checkpoint(ops.scattermoe_experts, x, w1, w2, idx, w, use_reentrant=False)
    y.sum().backward()
    print("RESULT" + json.dumps(seen))
""")


@interpreter_only
def test_backward_frees_recomputed_h_before_the_last_gradient():
    """Under gradient checkpointing the recomputed h [S, 2I] is referenced by the backward alone: it must be gone when
    d down, the last weight gradient, is allocated (ops.py, the note above experts_bwd_dh)."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", _FREED_SCRIPT], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.split("RESULT")[-1]) == [[True, True]]  # the forward's h and the recompute's


_UNUSED_GRADS_SCRIPT = textwrap.dedent("""
    import json, torch
    from monkey_patch.scattermoe import ops
    from tests.reference import random_problem

    received = []

    def spy_backward(ctx, dy, dh, daw, dcounts, dslot):
        received.append([dy is None, dh is None, daw is None])
        return ops._backward(ctx, dy, dh, daw, dcounts, dslot)

    ops.experts_fwd.register_autograd(spy_backward, setup_context=ops._setup_context)
    x, w1, w2, idx, w = random_problem(12, 4, 2, 32, 16, generator=torch.Generator().manual_seed(0))
    x.requires_grad_()
    ops.scattermoe_experts(x, w1, w2, idx, w).sum().backward()
    print("RESULT" + json.dumps(received))
""")


@interpreter_only
def test_backward_gets_no_zero_filled_gradients_for_h_and_aw():
    """h [S, 2I] and aw [S, I] are outputs of the forward op only to be saved: autograd must not hand the backward
    zero-filled gradients for them (two [S, *] fills and their memory in every layer's backward; ops._setup_context)."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", _UNUSED_GRADS_SCRIPT], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.split("RESULT")[-1]) == [[False, True, True]]  # dY given; dh, daw not made


def test_unsupported_activation_raises():
    model = _tiny("scattermoe", hidden_act="gelu")
    with pytest.raises(NotImplementedError, match="grouped_mm"):
        model(input_ids=torch.tensor([[1, 2, 3]]))

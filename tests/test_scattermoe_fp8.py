"""FP8 (e4m3) path of the scattermoe experts: quantisation math, kernels under the CPU interpreter, GPU numerics.

Shape legend: T tokens, K top_k, E experts, H hidden, I moe intermediate, S = T*K routed rows.

CPU: the Triton interpreter (triton 3.9) runs tl.dot on float8_e4m3fn operands exactly (checked 2026-11-28), but its
fp32 -> fp8 cast drops the mantissa carry (127.8 -> 64); the quantise kernel therefore rounds in fp32 itself
(fp8_quant._round_e4m3) and the cast only sees representable values. So the kernels run here on real e4m3 tensors,
and `fp8_emulation` (plain torch: the same quantisation points and scales, dequantised, float64 matmuls) checks them.

Tolerance table (relative Frobenius error; all outputs and gradients):
| comparison | tol | why |
| kernels vs fp8_emulation, fp32 master (interpreter; GPU with TF32 off) | 1e-4 | identical e4m3 operands and scales; only fp32 summation order differs (~1e-7), unless that moves an fp32 intermediate (aw, dH) across an e4m3 rounding boundary (~1e-6 per element, each such flip ~1e-3 of one element's contribution) |
| fp8 path vs fp64 unquantised reference | 0.1 | e4m3 keeps 3 mantissa bits: relative rounding <= 2^-4 per element, ~0.025 RMS; a GEMM output's relative error is the RMS of its operands' errors (independent roundings average over the contraction, they do not add up), ~0.035 per GEMM, and y, dX chain two quantised GEMMs plus SwiGLU: 0.05-0.07 measured (test_emulation_error_budget) |
"""
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from monkey_patch.scattermoe.fp8_quant import FP8_MAX, quantize_ref  # noqa: E402
from tests.reference import experts_reference, random_problem, rel_err  # noqa: E402

TOL_EMULATION = 1e-4
TOL_REFERENCE = 0.1
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (FP8 Triton kernels)")


def _dq(x, dim=-1):
    """Quantise over `dim` with the kernels' rule, dequantise, float64."""
    q, s = quantize_ref(x, dim)
    return q.double() * s.double()


def fp8_emulation(x_TH, gate_up_E2IH, down_EHI, top_k_index_TK, top_k_weights_TK, dy_TH):
    """Plain-torch model of ops.experts_fwd/bwd(fp8=True): the same quantisation points and scales, float64
    matmuls on the dequantised operands, intermediates (h, aw, dH) rounded to the master dtype as the kernels store
    them. Returns (y, dx, d gate_up, d down, d top_k_weights)."""
    from monkey_patch.scattermoe.ops import routing_metadata
    T, H = x_TH.shape
    K, E, dt = top_k_index_TK.shape[1], gate_up_E2IH.shape[0], x_TH.dtype
    counts_E, slot_S = routing_metadata(top_k_index_TK, E)
    tok_S = slot_S // K
    ends = counts_E.cumsum(0).tolist()
    segs = [(e, end - c, end) for e, (c, end) in enumerate(zip(counts_E.tolist(), ends)) if c]

    def grouped(a_SD, w_E, transpose):  # expert-sorted rows: a[rows of e] @ (w[e]^T or w[e])
        return torch.cat([a_SD[s:t] @ (w_E[e].T if transpose else w_E[e]) for e, s, t in segs])

    def wgrad(a_SM, b_SN, shape):  # out[e] = a[rows of e]^T @ b[rows of e]
        out = torch.zeros(shape, dtype=torch.float64, device=x_TH.device)
        for e, s, t in segs:
            out[e] = a_SM[s:t].double().T @ b_SN[s:t].double()
        return out

    w_S = top_k_weights_TK.reshape(-1)[slot_S].double()
    h_S2I = grouped(_dq(x_TH)[tok_S], _dq(gate_up_E2IH), True).to(dt).double()  # scales over H
    gate, up = h_S2I.chunk(2, dim=-1)
    aw_SI = (F.silu(gate) * up * w_S[:, None]).to(dt)
    buf_SH = grouped(_dq(aw_SI), _dq(down_EHI), True)  # scales over I
    y = buf_SH.new_zeros(T * K, H).index_copy(0, slot_S, buf_SH).view(T, K, H).sum(1)
    g_SI = grouped(_dq(dy_TH)[tok_S], _dq(down_EHI, dim=1), False)  # down scaled over H
    sig = torch.sigmoid(gate)
    dw_S = (g_SI * F.silu(gate) * up).sum(1)
    da = g_SI * w_S[:, None]
    dh_S2I = torch.cat([da * up * sig * (1 + gate * (1 - sig)), da * F.silu(gate)], 1).to(dt)
    dx_SH = grouped(_dq(dh_S2I), _dq(gate_up_E2IH, dim=1), False)  # gate_up scaled over 2I
    dx = dx_SH.new_zeros(T * K, H).index_copy(0, slot_S, dx_SH).view(T, K, H).sum(1)
    d_down = wgrad(dy_TH[tok_S], aw_SI, down_EHI.shape)
    d_gate_up = wgrad(dh_S2I, x_TH[tok_S], gate_up_E2IH.shape)
    dw = dw_S.new_zeros(T * K).index_copy(0, slot_S, dw_S).view(T, K)
    return y, dx, d_gate_up, d_down, dw


def run_fp8(x, w1, w2, idx, w, dy):
    """ops.scattermoe_experts(fp8=True) forward + backward: (y, dx, d gate_up, d down, d top_k_weights)."""
    from monkey_patch.scattermoe import ops
    ps = [t.clone().requires_grad_() for t in (x, w1, w2, w)]
    y = ops.scattermoe_experts(ps[0], ps[1], ps[2], idx, ps[3], fp8=True)
    y.backward(dy)
    return [y] + [ps[i].grad for i in range(4)]


def reference(x, w1, w2, idx, w, dy):
    """Unquantised float64 reference (tests/reference.py): (y, dx, d gate_up, d down, d top_k_weights)."""
    ps = [t.double().requires_grad_() for t in (x, w1, w2, w)]
    y = experts_reference(ps[0], ps[1], ps[2], idx, ps[3])
    y.backward(dy.double())
    return [y] + [p.grad for p in ps]


NAMES = ("y", "dx", "dgate_up", "ddown", "dw")


def _errs(outs, refs):
    return {n: rel_err(a, b) for n, a, b in zip(NAMES, outs, refs)}


# ---- CPU: quantisation math (plain torch) ------------------------------------------------------------------------

def test_quantize_ref_scales_zero_rows_saturation():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 64, generator=g) * torch.tensor([1e-3, 1.0, 30.0, 1e4, 1.0, 1.0, 1.0])[:, None]
    x[4] = 0.0                            # an all-zero row: zeros, finite scale
    x[5, 3], x[6, 9] = FP8_MAX, -2 * FP8_MAX  # row max exactly at 448 (scale 1) and at 896 (scale 2)
    q, s = quantize_ref(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (7, 1)
    mant, _ = torch.frexp(s)
    assert torch.all(mant == 0.5), "scales are powers of two"
    rowmax = q.float().abs().amax(1)
    keep = torch.arange(7) != 4
    assert torch.all((rowmax[keep] > FP8_MAX / 2) & (rowmax[keep] <= FP8_MAX)), rowmax  # the top binade, no NaN
    assert s[5].item() == 1.0 and q[5, 3].float() == FP8_MAX and s[6].item() == 2.0 and q[6, 9].float() == -FP8_MAX
    assert torch.all(q[4].float() == 0) and torch.isfinite(s[4]).all()
    assert torch.isfinite(q.float()).all()
    deq = q.double() * s.double()
    normal = q.float().abs() >= 2.0 ** -6   # e4m3 normal range: relative rounding <= 2^-4
    rel = ((deq - x.double()).abs() / x.double().abs())[normal]
    assert rel.max() <= 2.0 ** -4 + 1e-12 and rel.max() > 2.0 ** -6, rel.max()
    x_inf = x[:2].clone()
    x_inf[1, 0] = float("inf")
    assert torch.isnan(quantize_ref(x_inf)[0][1].float()).any()  # divergence shows, not clamped away
    qc, sc = quantize_ref(x[:4], dim=0)     # column scales: the same rule along the other axis
    assert sc.shape == (1, 64) and torch.equal(qc.float(), quantize_ref(x[:4].T)[0].T.float())


def test_emulation_error_budget():
    """The fp8 path's distance from the unquantised reference at a mid-size problem: the basis of TOL_REFERENCE."""
    g = torch.Generator().manual_seed(0)
    x, w1, w2, idx, w = random_problem(256, 8, 2, 256, 128, generator=g)
    dy = torch.randn(256, 256, generator=g)
    errs = _errs(fp8_emulation(x, w1, w2, idx, w, dy), reference(x, w1, w2, idx, w, dy))
    print({k: f"{v:.3f}" for k, v in errs.items()})
    assert all(0.005 < v < 0.08 for v in errs.values()), errs  # measured 0.054-0.067


# ---- CPU: kernels under TRITON_INTERPRET=1 ------------------------------------------------------------------------

_INTERPRET_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from monkey_patch.scattermoe.fp8_quant import quantize_cols_t, quantize_ref, quantize_rows
    from tests.reference import random_problem, rel_err
    from tests.test_scattermoe_fp8 import _errs, fp8_emulation, reference, run_fp8
    g = torch.Generator().manual_seed(0)
    quant = {}
    x = torch.randn(37, 50, generator=g) * torch.logspace(-3, 3, 37)[:, None]
    x[3] = 0.0
    x[5, 7] = 1e30  # one huge value: the rest of its row flushes to (signed) zero, as the torch rule does
    q, s = quantize_rows(x)
    qr, sr = quantize_ref(x)
    quant["rows"] = torch.equal(q.float(), qr.float()) and torch.equal(s, sr[:, 0])
    w = torch.randn(3, 40, 24, generator=g)
    q, s = quantize_cols_t(w)
    qr, sr = quantize_ref(w, dim=1)
    quant["cols_t"] = q.shape == (3, 24, 40) and torch.equal(q.float(), qr.transpose(1, 2).float()) \\
        and torch.equal(s, sr[:, 0])
    # every rounding case: both binade edges, ties, e4m3 subnormals; a 448 in the row pins the scale to 1
    v = torch.cat([torch.linspace(-448, 448, 20001), torch.linspace(-0.03, 0.03, 20001), torch.tensor([448.0])])
    q, s = quantize_rows(v[None])
    quant["rounding"] = s.item() == 1.0 and torch.equal(q.float()[0], v.to(torch.float8_e4m3fn).float())
    results = []
    for name, (T, E, K, H, I), routing in json.loads(sys.argv[1]):
        x, w1, w2, idx, w = random_problem(T, E, K, H, I, generator=torch.Generator().manual_seed(T))
        if routing is not None:
            idx = torch.tensor(routing).expand(T, K).contiguous()
        dy = torch.randn(T, H, generator=torch.Generator().manual_seed(1))
        outs = run_fp8(x, w1, w2, idx, w, dy)
        results.append([name, _errs(outs, fp8_emulation(x, w1, w2, idx, w, dy)),
                        _errs(outs, reference(x, w1, w2, idx, w, dy))])
    print("RESULT" + json.dumps({"quant": quant, "cases": results}))
""")

# Interpreter FP8 tiles are 16 x 16 x 32 (ops._FIXED_INTERPRET_FP8: K-steps of 32 as FP8 dots need on the GPU).
INTERPRET_CASES = [
    ("uneven_dims", (7, 5, 2, 24, 20), None),        # H, 2I, I below/not multiples of 32: masked D tails
    ("even_dims", (12, 4, 2, 64, 32), None),         # EVEN_D fast path, 2 K-steps
    ("two_experts_take_all", (40, 3, 2, 40, 20), [1, 2]),  # 3 M-tiles per expert, an empty expert
    ("one_token_topE", (1, 4, 4, 24, 20), None),     # K = E, one row per expert
    ("top1_prime_E", (9, 7, 1, 40, 36), None),       # K = 1, E prime
]


def test_fp8_kernels_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)  # must be set before triton is imported
    proc = subprocess.run([sys.executable, "-c", _INTERPRET_SCRIPT, json.dumps(INTERPRET_CASES)], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.split("RESULT")[-1])
    assert all(res["quant"].values()), res["quant"]
    for name, vs_emulation, vs_reference in res["cases"]:
        print(name, vs_emulation, vs_reference)
        assert all(v < TOL_EMULATION for v in vs_emulation.values()), (name, vs_emulation)
        # FP8 is really in effect (not a bf16/fp32 path), and within the stated budget
        assert all(1e-3 < v < TOL_REFERENCE for v in vs_reference.values()), (name, vs_reference)


def test_registration_fp8_cpu_path():
    """"scattermoe_fp8" is registered beside "scattermoe"; off CUDA it runs the same plain-torch path."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    from sft.model import preset_config
    from monkey_patch.scattermoe import scattermoe_experts_forward, scattermoe_fp8_experts_forward
    assert ALL_EXPERTS_FUNCTIONS["scattermoe_fp8"] is scattermoe_fp8_experts_forward
    assert ALL_EXPERTS_FUNCTIONS["scattermoe"] is scattermoe_experts_forward
    ids = torch.randint(0, 5000, (2, 16), generator=torch.Generator().manual_seed(0))
    logits = []
    for impl in ("scattermoe", "scattermoe_fp8"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(preset_config("tiny", use_cache=False), dtype=torch.float32,
                                                 experts_implementation=impl)
        assert model.config._experts_implementation == impl
        logits.append(model(input_ids=ids).logits)
    assert torch.equal(logits[0], logits[1])


# ---- GPU -------------------------------------------------------------------------------------------------------

# (name, T, E, K, H, I, routing): the bf16 suite's cases (tests/test_scattermoe_gpu.py).
CASES = [
    ("one_token", 1, 8, 2, 256, 128, None),
    ("empty_experts", 16, 64, 2, 256, 128, None),
    ("all_to_one", 300, 8, 2, 256, 128, [3, 5]),
    ("top1", 200, 8, 1, 256, 128, None),
    ("topE", 64, 6, 6, 256, 128, None),
    ("prime_experts", 256, 13, 3, 256, 128, None),
    ("odd_sizes", 257, 8, 2, 200, 100, None),       # H, I, 2I not multiples of FP8's 32-wide K-steps: masked tails
    ("qwen3_30b", 2048, 128, 8, 2048, 768, None),
]


def _gpu_problem(T, E, K, H, I, routing, dtype):
    seed = time.time_ns() % 2**31
    g = torch.Generator().manual_seed(seed)
    x, w1, w2, idx, w = random_problem(T, E, K, H, I, dtype=dtype, device="cuda", generator=g)
    if routing is not None:
        idx = torch.tensor(routing, device="cuda").expand(T, K).contiguous()
    return seed, (x, w1, w2, idx, w, torch.randn(T, H, generator=g).to(x))


@pytest.fixture
def gpu_env(monkeypatch):
    monkeypatch.setenv("SCATTERMOE_AUTOTUNE", "0")  # one fixed config: no retuning per test shape
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@needs_gpu
@pytest.mark.parametrize("name,T,E,K,H,I,routing", CASES, ids=[c[0] for c in CASES])
def test_fp8_kernels_match_emulation_fp32(name, T, E, K, H, I, routing, gpu_env):
    """fp32 master weights: the GPU kernels do exactly the emulated FP8 arithmetic (scales, masks, tails)."""
    seed, prob = _gpu_problem(T, E, K, H, I, routing, torch.float32)
    errs = _errs(run_fp8(*prob), fp8_emulation(*prob))
    print(name, {k: f"{v:.1e}" for k, v in errs.items()})
    assert all(v < TOL_EMULATION for v in errs.values()), (seed, errs)


@needs_gpu
@pytest.mark.parametrize("name,T,E,K,H,I,routing", CASES, ids=[c[0] for c in CASES])
def test_fp8_vs_reference_bf16(name, T, E, K, H, I, routing, gpu_env):
    """bf16 master weights (training's setting): output and every gradient within TOL_REFERENCE of fp64."""
    seed, prob = _gpu_problem(T, E, K, H, I, routing, torch.bfloat16)
    errs = _errs(run_fp8(*prob), reference(*prob))
    print(name, {k: f"{v:.1e}" for k, v in errs.items()})
    assert all(v < TOL_REFERENCE for v in errs.values()), (seed, errs)  # `<` is False for NaN


@needs_gpu
def test_fp8_torch_compile(gpu_env):
    from monkey_patch.scattermoe import ops
    _, (x, w1, w2, idx, w, dy) = _gpu_problem(64, 8, 2, 256, 128, None, torch.bfloat16)
    compiled = torch.compile(lambda *a: ops.scattermoe_experts(*a, fp8=True), fullgraph=True)
    ps = [t.clone().requires_grad_() for t in (x, w1, w2, w)]
    compiled(ps[0], ps[1], ps[2], idx, ps[3]).backward(dy)
    ref = run_fp8(x, w1, w2, idx, w, dy)
    for a, b in zip(ps, [ref[1], ref[2], ref[3], ref[4]]):
        assert rel_err(a.grad, b) < 1e-2

"""FP8 (e4m3) path of the scattermoe experts: quantisation math, kernels under the CPU interpreter, GPU numerics.

Shape legend: T tokens, K top_k, E experts, H hidden, I moe intermediate, S = T*K routed rows.

CPU: the Triton interpreter (triton 3.9) runs tl.dot on float8_e4m3fn operands exactly (checked 2026-11-28), but its
fp32 -> fp8 cast drops the mantissa carry (127.8 -> 64); the quantise kernel therefore rounds in fp32 itself
(fp8_quant._round_e4m3) and the cast only sees representable values. So the kernels run here on real e4m3 tensors,
and `fp8_emulation` (plain torch: the same quantisation points and scales, dequantised, float64 matmuls) checks them.

Tolerances (relative Frobenius error, every output and gradient: y, dx, d gate_up, d down, d top_k_weights):
- TOL_EMULATION 1e-4: kernels vs fp8_emulation with fp32 master weights under the interpreter. Identical
  e4m3 operands and scales, so only the fp32 summation order differs (measured 1e-8..1.3e-7 under the interpreter),
  unless that moves an fp32 intermediate (aw, dH) across an e4m3 rounding boundary (~1e-6 per element; one flip
  moves one element's contribution by 2^-4).
- TOL_EMULATION_GPU 1e-2: the same on the GPU, where FP8 tensor-core sums carry ~2^-14 relative error even when
  promoted to fp32 every K-tile (the DeepSeek-V3 report finds ~14 bits kept) and so move e4m3 roundings of aw and dH in a
  fraction ~2^-14 / 2^-4 of elements: sqrt(1e-3) * 2^-3 ~ 4e-3 predicted. A wrong scale or layout gives >= 0.5.
  The stages without downstream requantisation (h, and y from the kernel's own aw) are held to 1e-3.
- TOL_REFERENCE 0.12: the fp8 path vs the unquantised fp64 reference. e4m3 keeps 3 mantissa bits: relative rounding
  <= 2^-4 per element, ~0.025 RMS. A GEMM output's relative error is the RMS of its operands' errors (independent
  roundings average over the contraction; they do not add up with its length): ~0.035 per GEMM; y and dX chain two
  quantised GEMMs and SwiGLU: 0.054-0.067 measured (test_emulation_error_budget), 0.04-0.09 on interpreter shapes;
  with few routed rows the ratio fluctuates more (one token, H=40: 0.10 with bf16 master in a CPU dry run).
The GPU fp32 emulation comparison runs with SCATTERMOE_FP8_PROMOTE=all (every FP8 dot promoted to fp32 per K-tile);
the default mode's fast forward accumulation is covered by the reference comparison.
d top_k_weights is one dot product per routed row, whose relative error is 0.07 / |z| (z ~ N(0, 1): cancellation);
it averages out only over many rows, so with fewer than MIN_ROWS_DW routed rows it is checked against the emulation
only.
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
from tests.reference import interpreter_only, experts_reference, random_problem, rel_err  # noqa: E402

TOL_EMULATION = 1e-4
TOL_EMULATION_GPU = 1e-2
TOL_REFERENCE = 0.12
MIN_ROWS_DW = 64
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (FP8 Triton kernels)")


def _dq(x, dim=-1):
    """Quantise over `dim` with the kernels' rule, dequantise, float64."""
    q, s = quantize_ref(x, dim)
    return q.double() * s.double()


def fp8_emulation(x_TH, gate_up_E2IH, down_EHI, top_k_index_TK, top_k_weights_TK, dy_TH, aw_SI=None):
    """Plain-torch model of ops.experts_fwd/bwd(fp8=True): the same quantisation points and scales, float64
    matmuls on the dequantised operands, intermediates (h, aw, dH) rounded to the master dtype as the kernels store
    them. Returns (y, dx, d gate_up, d down, d top_k_weights, h). aw_SI given (the kernels' own, expert-sorted)
    replaces the emulated one downstream, so y can be compared free of rounding-boundary flips in aw."""
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
    aw_SI = (F.silu(gate) * up * w_S[:, None]).to(dt) if aw_SI is None else aw_SI
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
    return y, dx, d_gate_up, d_down, dw, h_S2I


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


def check_vs_reference(errs, rows):
    """FP8 is really in effect (errors above fp32/bf16 levels) and within TOL_REFERENCE (`<` is False for NaN)."""
    checked = {k: v for k, v in errs.items() if k != "dw" or rows >= MIN_ROWS_DW}
    return all(1e-3 < v < TOL_REFERENCE for v in checked.values())


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
    # bf16 master weights (training's dtype): quantise kernels read bf16, h / aw / dH are stored bf16. The weight
    # gradients are left out: they are bf16 tl.dots, which the interpreter computes wrongly (tests/test_scattermoe_cpu.py).
    x, w1, w2, idx, w = random_problem(33, 6, 2, 40, 36, dtype=torch.bfloat16, generator=g)
    dy = torch.randn(33, 40, generator=g).bfloat16()
    errs = _errs(run_fp8(x, w1, w2, idx, w, dy), fp8_emulation(x, w1, w2, idx, w, dy))
    print("RESULT" + json.dumps({"quant": quant, "cases": results, "bf16": [errs[k] for k in ("y", "dx", "dw")]}))
""")

# Interpreter FP8 tiles are 16 x 16 x 32 (ops._FIXED_INTERPRET_FP8: K-steps of 32 as FP8 dots need on the GPU).
INTERPRET_CASES = [
    ("uneven_dims", (7, 5, 2, 24, 20), None),        # H, 2I, I below/not multiples of 32: masked D tails
    ("even_dims", (12, 4, 2, 64, 32), None),         # EVEN_D fast path, 2 K-steps
    ("two_experts_take_all", (40, 3, 2, 40, 20), [1, 2]),  # 3 M-tiles per expert, an empty expert
    ("one_token_topE", (1, 4, 4, 24, 20), None),     # K = E, one row per expert
    ("top1_prime_E", (9, 7, 1, 40, 36), None),       # K = 1, E prime
]


@interpreter_only
def test_fp8_kernels_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)  # must be set before triton is imported
    proc = subprocess.run([sys.executable, "-c", _INTERPRET_SCRIPT, json.dumps(INTERPRET_CASES)], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.split("RESULT")[-1])
    assert all(res["quant"].values()), res["quant"]
    for (name, (T, E, K, H, I), _), (_, vs_emulation, vs_reference) in zip(INTERPRET_CASES, res["cases"]):
        print(name, vs_emulation, vs_reference)
        assert all(v < TOL_EMULATION for v in vs_emulation.values()), (name, vs_emulation)
        assert check_vs_reference(vs_reference, T * K), (name, vs_reference)
    # A plumbing check only (dtypes, strides, scale pointers: a wrong one gives errors near 1): the interpreter's
    # fp32 -> bf16 cast truncates (max error 0.0149 against round-to-nearest's 0.0076 on randn, triton 3.9), so the
    # bf16-stored h / aw / dH differ from the emulation's and move e4m3 roundings (measured 0.006..0.035).
    assert all(v < 0.06 for v in res["bf16"]), res["bf16"]


_GATHER_ARGS = {"a_ptr": "*fp8e4nv", "b_ptr": "*fp8e4nv", "c_ptr": "*bf16", "tok_ptr": "*i32", "counts_ptr": "*i32",
                "h_ptr": "*bf16", "w_ptr": "*fp32", "aux_ptr": "*bf16", "a_scale_ptr": "*fp32", "b_scale_ptr": "*fp32",
                "S": "i32", "E": "i32", "N": "i32", "D": "i32", "stride_am": "i32", "stride_be": "i32",
                "stride_bn": "i32", "S_BUCKET": "i32"}
_SCATTER_ARGS = {"a_ptr": "*fp8e4nv", "b_ptr": "*fp8e4nv", "c_ptr": "*bf16", "slot_ptr": "*i64", "counts_ptr": "*i32",
                 "a_scale_ptr": "*fp32", "b_scale_ptr": "*fp32", "S": "i32", "E": "i32", "N": "i32", "D": "i32",
                 "stride_am": "i32", "stride_be": "i32", "stride_bn": "i32", "stride_cm": "i32", "S_BUCKET": "i32"}


def _ttgir_sm90(fn, arg_types, constexprs, num_warps):
    """Compile a kernel ahead of time for sm_90 (Hopper) without a GPU; returns its TTGIR text."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    sig = {**arg_types, **{k: "constexpr" for k in constexprs}}
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": 3}).asm["ttgir"]


def test_fp8_kernels_compile_for_hopper():
    """The FP8 variants lower to Hopper FP8 wgmma (K-major operands; no mma_v2 fallback), with FP8_PROMOTE setting
    the promotion interval to BLOCK_D and fast accumulation (2^30) otherwise. Checks lowering only, not speed."""
    pytest.importorskip("triton.backends.nvidia.compiler", reason="triton without its NVIDIA backend")
    from monkey_patch.scattermoe import kernels as kn
    common = dict(E_P2=128, DOT_PREC="tf32", EVEN_D=True, FP8=True, stride_bd=1, BLOCK_M=128, BLOCK_N=128, BLOCK_D=64)
    cases = [  # (kernel, argument types, constexprs, expected maxNumImpreciseAcc, wgmma count)
        (kn._gather_matmul_kernel, _GATHER_ARGS, dict(common, BACKWARD=False, FP8_PROMOTE=False), 2 ** 30, 2),
        (kn._gather_matmul_kernel, {**_GATHER_ARGS, "aux_ptr": "*fp32"}, dict(common, BACKWARD=True, FP8_PROMOTE=True),
         64, 1),
        (kn._scatter_matmul_kernel, _SCATTER_ARGS, dict(common, FP8_PROMOTE=True), 64, 1),
    ]
    for fn, args, consts, imprecise, n_dots in cases:
        dots = [line for line in _ttgir_sm90(fn, args, consts, 8).splitlines() if "ttng.warp_group_dot " in line]
        assert len(dots) == n_dots and all("f8E4M3FN" in d for d in dots), dots
        assert all(f"maxNumImpreciseAcc = {imprecise} " in d for d in dots), dots
    from monkey_patch.scattermoe.fp8_quant import _quantize_kernel
    quant_args = {"x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "M": "i32", "D": "i32", "stride_xg": "i32",
                  "stride_xm": "i32", "stride_xd": "i32", "stride_qg": "i32", "stride_qm": "i32"}
    for consts in (dict(BLOCK_M=2, BLOCK_D=2048, ONE_TILE=True), dict(BLOCK_M=64, BLOCK_D=64, ONE_TILE=False)):
        assert "tt.fp_to_fp" in _ttgir_sm90(_quantize_kernel, quant_args, consts, 4)  # the e4m3 cast is there


def test_registration_fp8_cpu_path():
    """"scattermoe_fp8" is registered beside "scattermoe"; off CUDA it runs the same plain-torch path."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    from sft.model import preset_config
    from monkey_patch.scattermoe import scattermoe_experts_forward, scattermoe_fp8_experts_forward
    # registered inside the --recompute_experts wrapper (monkey_patch/kept_experts.py)
    assert ALL_EXPERTS_FUNCTIONS["scattermoe_fp8"].__wrapped__ is scattermoe_fp8_experts_forward
    assert ALL_EXPERTS_FUNCTIONS["scattermoe"].__wrapped__ is scattermoe_experts_forward
    ids = torch.randint(0, 5000, (2, 16), generator=torch.Generator().manual_seed(0))
    logits = []
    for impl in ("scattermoe", "scattermoe_fp8"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(preset_config("tiny", use_cache=False), dtype=torch.float32,
                                                 experts_implementation=impl)
        assert model.config._experts_implementation == impl
        model.set_experts_implementation("eager")
        model.set_experts_implementation(impl)
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


DEVICE = "cuda"  # a dry run of these tests' code under the CPU interpreter sets "cpu"


def _gpu_problem(T, E, K, H, I, routing, dtype):
    seed = time.time_ns() % 2**31
    g = torch.Generator().manual_seed(seed)
    x, w1, w2, idx, w = random_problem(T, E, K, H, I, dtype=dtype, device=DEVICE, generator=g)
    if routing is not None:
        idx = torch.tensor(routing, device=DEVICE).expand(T, K).contiguous()
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
def test_fp8_kernels_match_emulation_fp32(name, T, E, K, H, I, routing, gpu_env, monkeypatch):
    """fp32 master weights: the GPU kernels do exactly the emulated FP8 arithmetic (scales, masks, tails)."""
    monkeypatch.setenv("SCATTERMOE_FP8_PROMOTE", "all")
    from monkey_patch.scattermoe import ops
    seed, prob = _gpu_problem(T, E, K, H, I, routing, torch.float32)
    errs = _errs(run_fp8(*prob), fp8_emulation(*prob))
    y, h, aw = ops.experts_fwd(*prob[:5], True)[:3]
    ref = fp8_emulation(*prob, aw_SI=aw)
    errs.update(h_stage=rel_err(h, ref[5]), y_from_own_aw=rel_err(y, ref[0]))
    print(name, {k: f"{v:.1e}" for k, v in errs.items()})
    assert errs["h_stage"] < 1e-3 and errs["y_from_own_aw"] < 1e-3, (seed, errs)
    assert all(v < TOL_EMULATION_GPU for v in errs.values()), (seed, errs)


@needs_gpu
@pytest.mark.parametrize("name,T,E,K,H,I,routing", CASES, ids=[c[0] for c in CASES])
def test_fp8_vs_reference_bf16(name, T, E, K, H, I, routing, gpu_env):
    """bf16 master weights (training's setting): output and every gradient within TOL_REFERENCE of fp64."""
    seed, prob = _gpu_problem(T, E, K, H, I, routing, torch.bfloat16)
    errs = _errs(run_fp8(*prob), reference(*prob))
    print(name, {k: f"{v:.1e}" for k, v in errs.items()})
    assert check_vs_reference(errs, T * K), (seed, errs)


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


@needs_gpu
def test_fp8_tiny_model_compiled_layers(gpu_env):
    """As --fp8 runs it (compile_layers auto): the registered implementation inside compiled decoder layers gives
    the eager-mode loss, within FP8's distance of the bf16 kernel's, and finite gradients everywhere."""
    from sft.model import preset_config
    from transformers import AutoModelForCausalLM
    import monkey_patch.scattermoe  # noqa: F401  (registers "scattermoe_fp8")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(preset_config("tiny", use_cache=False), dtype=torch.bfloat16,
                                             experts_implementation="scattermoe_fp8", attn_implementation="sdpa")
    model.to(DEVICE)
    ids = torch.randint(0, 1000, (2, 64), device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(0))
    with torch.no_grad():
        eager_fp8 = model(input_ids=ids, labels=ids).loss.item()
        model.set_experts_implementation("scattermoe")
        bf16 = model(input_ids=ids, labels=ids).loss.item()
        model.set_experts_implementation("scattermoe_fp8")
    for layer in model.model.layers:
        layer.compile()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    print("losses: fp8 eager", eager_fp8, "fp8 compiled", loss.item(), "bf16", bf16)
    assert abs(loss.item() - eager_fp8) < 1e-2 * abs(eager_fp8)
    assert abs(eager_fp8 - bf16) < 2e-2 * abs(bf16)  # a loss averages FP8's ~7% per-element noise away
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)

"""Compile every bf16 scattermoe kernel x autotune config ahead of time for sm_90 on a machine without a GPU and
print ptxas -v resource usage (registers, spill stores / loads, shared memory), the wgmma instruction count and the
layout conversions (ttg.convert_layout in the TTGIR: each one of a 2-D tile goes through shared memory) per config.

A lead, not a measurement: the GPU session runs another Triton (3.6 there, this machine's 3.9 here), and
spills or registers say nothing certain about speed. Shapes: Qwen3-30B-A3B experts (H=2048, I=768, E=128), bf16.

    python bench/sm90_compile_report.py            # markdown table on stdout (~1-2 min on 2 CPU cores)
"""
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")  # the package imports torchao (TRAPS.md)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from monkey_patch.scattermoe import kernels as kn  # noqa: E402

H, I, E = 2048, 768, 128
TARGET = GPUTarget("cuda", 90, 32)

_GATHER = {"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*bf16", "tok_ptr": "*i32", "counts_ptr": "*i32",
           "h_ptr": "*bf16", "w_ptr": "*fp32", "aux_ptr": "*bf16", "a_scale_ptr": "*fp32", "b_scale_ptr": "*fp32",
           "S": "i32", "E": "i32", "N": "i32", "D": "i32", "stride_am": "i32", "stride_be": "i32", "stride_bd": "i32",
           "stride_bn": "i32", "S_BUCKET": "i32"}
_SCATTER = {"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*bf16", "slot_ptr": "*i64", "counts_ptr": "*i32",
            "a_scale_ptr": "*bf16", "b_scale_ptr": "*bf16", "S": "i32", "E": "i32", "N": "i32", "D": "i32",
            "stride_am": "i32", "stride_be": "i32", "stride_bd": "i32", "stride_bn": "i32", "stride_cm": "i32",
            "S_BUCKET": "i32"}
_WGRAD = {"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*bf16", "a_idx_ptr": "*i32", "b_idx_ptr": "*i32",
          "counts_ptr": "*i32", "order_ptr": "*i32", "E": "i32", "M": "i32", "N": "i32", "stride_ar": "i32",
          "stride_br": "i32", "stride_ce": "i32", "stride_cm": "i32", "S_BUCKET": "i32"}
_BASE = dict(E_P2=E, DOT_PREC="ieee")
# (row label, kernel, arg types, runtime constexprs, stride args equal to 1 (Triton specialises them), configs)
CASES = [
    ("gate_up fwd (D=H, N=I)", kn._gather_matmul_kernel, _GATHER,
     dict(_BASE, BACKWARD=False, EVEN_D=True, FP8=False, FP8_PROMOTE=False), ["stride_bd"],
     kn.GATE_UP_CONFIGS),
    ("dY@down + SwiGLU bwd (D=H, N=I)", kn._gather_matmul_variant_kernel, {**_GATHER, "aux_ptr": "*fp32"},
     dict(_BASE, BACKWARD=True, EVEN_D=True, FP8=False, FP8_PROMOTE=False, SWIGLU_LEAN=False), ["stride_bn"],
     kn.SWIGLU_BWD_CONFIGS),
    ("down fwd (D=I, N=H)", kn._scatter_matmul_kernel, _SCATTER,
     dict(_BASE, EVEN_D=True, FP8=False, FP8_PROMOTE=False), ["stride_bd"], kn.SCATTER_CONFIGS),
    ("dX (D=2I, N=H)", kn._scatter_matmul_kernel, _SCATTER,
     dict(_BASE, EVEN_D=True, FP8=False, FP8_PROMOTE=False), ["stride_bn"], kn.SCATTER_CONFIGS),
    ("d down wgrad (M=H, N=I, A gathered)", kn._expert_wgrad_kernel, _WGRAD,
     dict(_BASE, A_GATHER=True, B_GATHER=False), [], kn.WGRAD_CONFIGS),
    ("d gate_up wgrad (M=2I, N=H, B gathered)", kn._expert_wgrad_kernel, _WGRAD,
     dict(_BASE, A_GATHER=False, B_GATHER=True), [], kn.WGRAD_CONFIGS),
]


def compile_sm90(fn, arg_types, constexprs, ones, num_warps, num_stages):
    """Compiled kernel for sm_90 with the runtime's specialisations: the listed strides == 1 become constexpr,
    every other pointer / int argument is marked divisible by 16 (true at the Qwen3 shapes and torch allocations)."""
    constexprs = {**constexprs, **{k: 1 for k in ones}}
    sig = {**{k: v for k, v in arg_types.items() if k not in ones}, **{k: "constexpr" for k in constexprs}}
    attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k in arg_types if k not in ones}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=TARGET, options={"num_warps": num_warps, "num_stages": num_stages})


def ptxas_usage(ptx):
    """(registers, spill store bytes, spill load bytes) from ptxas -v with the flags Triton 3.9 uses for sm_90a."""
    ptxas = get_ptxas(90).path  # the ptxas Triton itself picks for sm_90 (ptxas-blackwell, CUDA 13.x, in 3.9)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        log = subprocess.run([ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a", path, "-o",
                              path + ".o"], capture_output=True, text=True)
    if "Used" not in log.stderr:
        raise RuntimeError(log.stderr[-2000:])
    log = log.stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    st, ld = map(int, re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log).groups())
    return regs, st, ld


def main():
    print("| kernel | config (BM, BN, BD/BR, warps, stages, variant) | regs | spill st/ld B | smem KB | wgmma | "
          "cvt (fp32 2-D) |")
    print("|---|---|---|---|---|---|---|")
    for label, fn, args, consts, ones, configs in CASES:
        for cfg in configs:
            kw = dict(cfg.kwargs)
            blocks = {k: v for k, v in kw.items() if k.startswith("BLOCK")}
            variant = {k: v for k, v in kw.items() if not k.startswith("BLOCK")}
            merged = {**consts, **kw}
            merged = {k: v for k, v in merged.items() if k in fn.arg_names}
            ck = compile_sm90(fn, args, merged, ones, cfg.num_warps, cfg.num_stages)
            regs, st, ld = ptxas_usage(ck.asm["ptx"])
            wgmma = ck.asm["ptx"].count("wgmma.mma_async")
            cvts = [line.split("->")[-1] for line in ck.asm["ttgir"].splitlines() if "ttg.convert_layout" in line]
            cvt_f32 = sum(bool(re.search(r"tensor<\d+x\d+xf32", c)) for c in cvts)
            desc = ", ".join(str(v) for v in blocks.values()) + f", {cfg.num_warps}w, {cfg.num_stages}s"
            if variant:
                desc += ", " + ", ".join(f"{k}={v}" for k, v in variant.items())
            print(f"| {label} | {desc} | {regs} | {st}/{ld} | {ck.metadata.shared / 1024:.0f} | {wgmma} | "
                  f"{len(cvts)} ({cvt_f32}) |",
                  flush=True)


if __name__ == "__main__":
    main()

"""monkey_patch/linear_cross_entropy.py against torch's cross_entropy on materialised logits, on fresh random data.

CPU: the Triton kernel under TRITON_INTERPRET=1 (a subprocess: the variable must be set before triton is imported),
fp32, where both sides compute the same sums in a different order: loss and both gradients to 1e-5 relative.
GPU: bf16 at a vocabulary that spans several kernel blocks, against an fp32 reference, held to Liger's own distance
from it; and the forward and backward with sync debug mode "error", so a host sync fails the test.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.reference import interpreter_only

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# 37 tokens in chunks of 8 (a partial last chunk) and of 64 (one chunk); every fifth token not trained; the three
# ways a count arrives (None: the mean over trained tokens; an int; a tensor); the loss scaled by 3 before backward,
# so a backward that ignored grad_output would be off by 3x. Vocabulary 300 with 128-column blocks: three blocks,
# the last one partial.
CPU_CHECK = textwrap.dedent("""
    import torch, torch.nn.functional as F
    import monkey_patch.linear_cross_entropy as lce
    lce.MAX_BLOCK = 128
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 16, generator=g, requires_grad=True)
    w = torch.randn(300, 16, generator=g, requires_grad=True)
    t = torch.randint(0, 300, (37,), generator=g)
    t[::5] = -100
    for count in (None, 50, torch.tensor(50)):
        for chunk in (8, 64):
            x.grad = w.grad = None
            loss = lce.linear_cross_entropy(x, w, t, count, chunk_tokens=chunk)
            (3 * loss).backward()
            got = (loss.detach(), x.grad.clone(), w.grad.clone())
            x.grad = w.grad = None
            ref = F.cross_entropy(x @ w.t(), t, ignore_index=-100, reduction="mean" if count is None else "sum")
            ref = ref if count is None else ref / 50
            (3 * ref).backward()
            for a, b in zip(got, (ref.detach(), x.grad, w.grad)):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # no gradient wanted: the loss alone, the logits left as they are
        torch.testing.assert_close(lce.linear_cross_entropy(x, w, t, chunk_tokens=8),
                                   F.cross_entropy(x @ w.t(), t, ignore_index=-100), rtol=1e-5, atol=1e-6)
    assert torch.isnan(lce.linear_cross_entropy(x, w, torch.full_like(t, -100)))  # nothing trained: nan, as torch
    loss = lce.linear_cross_entropy(x, w, t)
    loss.backward(retain_graph=True)
    try:
        loss.backward()
    except RuntimeError as error:
        assert "retain_graph" in str(error)
    else:
        raise AssertionError("a second backward must be refused")
    print("ok")
""")


@interpreter_only
def test_matches_torch_cross_entropy_on_cpu_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", CPU_CHECK], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def test_bad_shapes_and_chunks_are_refused():
    from monkey_patch.linear_cross_entropy import linear_cross_entropy

    x, w, t = torch.zeros(4, 8), torch.zeros(10, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"hidden \[N, H\], weight \[V, H\], target \[N\]"):
        linear_cross_entropy(x, torch.zeros(10, 7), t)
    with pytest.raises(ValueError, match="chunk_tokens=0"):
        linear_cross_entropy(x, w, t, chunk_tokens=0)


def test_causal_lm_loss_refuses_what_it_does_not_compute():
    from monkey_patch.linear_cross_entropy import causal_lm_loss

    with pytest.raises(NotImplementedError, match="--ce_kernel liger"):
        causal_lm_loss(2048)(torch.zeros(1, 4, 8), torch.zeros(10, 8), torch.zeros(1, 4, dtype=torch.long), 8,
                             final_logit_softcapping=30.0)


# bf16 at 4,096 tokens x 2,048 hidden, 32,768 + 1,000 vocabulary (two blocks, the second partial), 1,024-token chunks.
# Both fused kernels round the logits, their gradient and the lm_head gradient to bf16 (one bf16 addmm per chunk);
# the fp32 reference does not. Ours is held to Liger's own distance from the reference: at most 1.5x it, plus 1% of
# the reference's scale for a tensor where Liger's error happens to be tiny.
GPU_CHECK = textwrap.dedent("""
    import torch, torch.nn.functional as F
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    from monkey_patch.linear_cross_entropy import linear_cross_entropy
    g = torch.Generator(device="cuda").manual_seed(0)
    n, h, v = 4096, 2048, 33768
    x0 = torch.randn(n, h, device="cuda", generator=g).bfloat16()
    w0 = (torch.randn(v, h, device="cuda", generator=g) * h ** -0.5).bfloat16()
    t = torch.randint(0, v, (n,), device="cuda", generator=g)
    t[::7] = -100
    count = (t != -100).sum()

    def run(fn, dtype):
        x, w = x0.to(dtype).clone().requires_grad_(), w0.to(dtype).clone().requires_grad_()  # fresh leaves
        loss = fn(x, w)
        (2 * loss).backward()
        return loss.float(), x.grad.float(), w.grad.float()

    ref = run(lambda x, w: F.cross_entropy(x @ w.t(), t, ignore_index=-100, reduction="sum") / count, torch.float32)
    liger = run(lambda x, w: liger_fused_linear_cross_entropy(x, w, t, reduction="sum") / count, torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # from here a host sync raises
    ours = run(lambda x, w: linear_cross_entropy(x, w, t, count, chunk_tokens=1024), torch.bfloat16)
    torch.cuda.set_sync_debug_mode(0)
    for name, a, b, r in zip(("loss", "grad_x", "grad_w"), ours, liger, ref):
        ours_err, liger_err = (a - r).abs().max().item(), (b - r).abs().max().item()
        bound = 1.5 * liger_err + 0.01 * r.abs().max().item()
        print(name, ours_err, liger_err, bound)
        assert ours_err <= bound, (name, ours_err, liger_err)
    print("ok")
""")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled Triton kernel needs a CUDA GPU")
def test_bf16_on_gpu_as_close_as_liger_and_without_host_syncs():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))  # keep the site's
    proc = subprocess.run([sys.executable, "-c", GPU_CHECK], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]

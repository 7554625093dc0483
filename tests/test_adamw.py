"""sft/adamw.py: FusedAdamW against torch.optim.AdamW with clip_grad_norm_, on fresh random data.

CPU: the Triton kernel under TRITON_INTERPRET=1 (in a subprocess: the variable must be set before triton is
imported), fp32, where both sides compute the same float32 expressions: they agree to rounding (rtol 1e-5), and each
resumes from the other's state_dict. GPU: the compiled kernel in fp32 the same way, and on bf16 parameters and states
against torch's fused AdamW and an fp32 reference (the bound is explained in CHECK).
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.reference import interpreter_only

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Shapes cross the kernel's 4096-element block edge and include a one-element tensor; two parameter groups (decay,
# no decay) as the Trainer builds them; gradients large enough that clipping at 1.0 applies, then small ones.
CHECK = textwrap.dedent("""
    import sys
    import torch
    from sft.adamw import FusedAdamW, clip_grad_norm

    def run(dtype, device, ours, low, steps=4, max_norm=1.0):  # data drawn in `low` (bf16 for a bf16 run's reference)
        g = torch.Generator().manual_seed(0)
        shapes = [(5000,), (64, 65), (1,), (3, 4097)]
        params = [torch.nn.Parameter(torch.randn(s, generator=g).to(low).to(dtype).to(device)) for s in shapes]
        groups = [{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:], "weight_decay": 0.0}]
        kwargs = dict(lr=3e-2, betas=(0.9, 0.95), eps=1e-8)
        opt = FusedAdamW(groups, **kwargs) if ours else torch.optim.AdamW(groups, fused=device == "cuda", **kwargs)
        norms = []
        for step in range(steps):
            scale = 10.0 if step < 2 else 0.01  # clipped, then not
            for p in params:  # drawn in bf16 where the run is bf16, so the fp32 reference sees the same gradients
                p.grad = (torch.randn(p.shape, generator=g) * scale).to(low).to(dtype).to(device)
            exact = float(sum((p.grad.double() ** 2).sum() for p in params) ** 0.5)
            norms.append((float(clip_grad_norm(params, max_norm, opt)), exact))
            opt.step()
        return params, opt, norms

    dtype, device = getattr(torch, sys.argv[1]), sys.argv[2]
    if device == "cpu":
        # torch 2.13's CPU AdamW on 2 threads (the CI machine's) is not repeatable: in about one process in four its
        # first step() put the second thread's half of a 5000-element parameter 8.6e-6 from an fp64 AdamW, later
        # step()s of the same inputs 2.0e-7. One thread gave the same result in 20 of 20 processes.
        torch.set_num_threads(1)
    ours, opt, n1 = run(dtype, device, True, dtype)
    ref, ref_opt, n2 = run(dtype, device, False, dtype)
    # Our norm sums squares in fp32 (only the order differs from fp64); torch rounds bf16 gradients' norms to bf16.
    assert all(abs(ours - exact) <= 1e-5 * exact for ours, exact in n1) and n1[0][0] > 1.0, n1
    assert all(abs(theirs - exact) <= 2 ** -7 * exact for theirs, exact in n2), n2
    for p, q in zip(ours, ref):
        assert float(opt.state[p]["step"]) == float(ref_opt.state[q]["step"]) == 4
    if dtype == torch.float32:  # the same float32 expressions on both sides: equal to rounding
        rtol, atol = 1e-5, 1e-7
        for p, q in zip(ours, ref):
            torch.testing.assert_close(p, q, rtol=rtol, atol=atol)
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(opt.state[p][key], ref_opt.state[q][key], rtol=rtol, atol=atol)
    else:
        # bf16 parameters and states are rounded once per step on both sides, but torch's clip_grad_norm_ also rounds
        # the clipped gradients to bf16 before its AdamW reads them, where ours keeps them in fp32: results differ by
        # rounding flips that later steps carry. Both are held to the same fp32 computation from the same bf16 start
        # and gradients: ours may be at most twice as far from it as torch's own bf16 result is, plus one bf16
        # rounding at the tensor's largest magnitude (for a tensor where torch's error happens to be 0).
        truth, _, _ = run(torch.float32, device, False, dtype)
        for p, q, t in zip(ours, ref, truth):
            ours_err, torch_err = (p.float() - t).abs().max(), (q.float() - t).abs().max()
            assert ours_err <= 2 * torch_err + 2 ** -8 * t.abs().max(), (float(ours_err), float(torch_err))
        print("ok")
        sys.exit(0)
    # The state is torch's: each optimizer resumes from the other's state_dict and takes the same next step (fp32,
    # where both compute the same: the state's format does not depend on the dtype).
    def same_groups(optimizer):
        return [{"params": group["params"]} for group in optimizer.param_groups]

    params = [p for group in opt.param_groups for p in group["params"]]
    ref_params = [p for group in ref_opt.param_groups for p in group["params"]]
    swapped = torch.optim.AdamW(same_groups(ref_opt), lr=3e-2)
    swapped.load_state_dict(opt.state_dict())
    again = FusedAdamW(same_groups(opt), lr=3e-2)
    again.load_state_dict(ref_opt.state_dict())
    assert all(state["step"].device.type == "cpu" for state in again.state.values())  # read without a sync
    for p in params + ref_params:
        p.grad = torch.ones_like(p)
    swapped.step(); again.step()
    for a, b in zip(params, ref_params):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
    print("ok")
""")


@interpreter_only
def test_fused_adamw_matches_torch_on_cpu_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", CHECK, "float32", "cpu"], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled Triton kernel needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_fused_adamw_matches_torch_fused_on_gpu(dtype):
    proc = subprocess.run([sys.executable, "-c", CHECK, dtype, "cuda"], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=ROOT), timeout=600)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def test_torch_optimizers_keep_torch_clipping():
    from sft.adamw import clip_grad_norm
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([3.0, 4.0, 0.0])
    opt = torch.optim.SGD([p], lr=1.0)
    assert float(clip_grad_norm([p], 1.0, opt)) == pytest.approx(5.0)
    torch.testing.assert_close(p.grad, torch.tensor([0.6, 0.8, 0.0]), rtol=1e-5, atol=1e-6)


def test_unsupported_options_are_refused():
    from sft.adamw import FusedAdamW
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.ones(3)
    with pytest.raises(ValueError, match="amsgrad"):
        opt = FusedAdamW([p])
        opt.param_groups[0]["amsgrad"] = True
        opt.step()


TRAINER_CHECK = textwrap.dedent("""
    import random, sys, tempfile
    import torch
    from transformers import TrainingArguments
    from sft.collate import PackedCollator, pack_examples
    from sft.model import load_model
    from sft.trainer import SFTTrainer, fused_adamw_setup

    rng = random.Random(0)
    examples = [{"input_ids": (ids := [rng.randrange(1000, 5000) for _ in range(n)]), "labels": ids}
                for n in (40, 25, 60, 33, 50, 45)]
    rows = pack_examples(examples, 64)

    def train(ours):
        model = load_model("tiny", dtype=torch.float32, seed=0, experts_implementation="eager")
        args = TrainingArguments(output_dir=tempfile.mkdtemp(), max_steps=3, learning_rate=1e-3, weight_decay=0.1,
                                 max_grad_norm=0.5, per_device_train_batch_size=1, lr_scheduler_type="constant",
                                 report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, seed=0,
                                 remove_unused_columns=False, dataloader_pin_memory=False)
        trainer = SFTTrainer(model=model, args=args, train_dataset=rows, data_collator=PackedCollator(),
                             optimizer_cls_and_kwargs=fused_adamw_setup(args) if ours else None)
        trainer.train()
        norms = [log["grad_norm"] for log in trainer.state.log_history if "grad_norm" in log]
        decay = sorted(group["weight_decay"] for group in trainer.optimizer.param_groups)
        return dict(model.named_parameters()), norms, decay, type(trainer.optimizer.optimizer).__name__

    ours, ours_norms, ours_decay, name = train(True)
    ref, ref_norms, ref_decay, ref_name = train(False)
    assert (name, ref_name) == ("FusedAdamW", "AdamW"), (name, ref_name)
    assert ours_decay == ref_decay == [0.0, 0.1], (ours_decay, ref_decay)  # the Trainer's grouping, both times
    assert min(ref_norms) > 0.5 and len(ours_norms) == 3, ref_norms  # every step clipped
    for a, b in zip(ours_norms, ref_norms):
        assert abs(a - b) <= 1e-4 * b, (ours_norms, ref_norms)
    for key in ref:
        torch.testing.assert_close(ours[key], ref[key], rtol=1e-4, atol=1e-6, msg=key)
    print("ok")
""")


@interpreter_only
def test_trainer_with_fused_adamw_trains_like_the_stock_trainer():
    """SFTTrainer + fused_adamw_setup (train.py's wiring) against the stock Trainer's AdamW on the tiny model, fp32,
    3 clipped steps: the same parameter groups and weight decay, the same gradient norms, the same weights (rtol 1e-4:
    three steps of the whole model, where fp32 reductions of different order may differ in the last bits)."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", TRAINER_CHECK], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]

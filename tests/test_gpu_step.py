"""train.py's one-GPU defaults on the tiny model (our experts with their activations kept, Liger, varlen packed
attention, gradient checkpointing, our AdamW with clipping folded in): GPU only.

- Our code adds no host sync to a step: one step of forward, backward, clip_grad_norm and AdamW under sync debug
  mode (sft/host_syncs.py), and every sync found is Liger's fused cross-entropy's.
- SFTTrainer trains with this stack through train.py's wiring: pinned batches copied asynchronously, FusedAdamW.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHECK = textwrap.dedent("""
    import random, tempfile
    import torch
    from transformers import TrainingArguments
    from monkey_patch import apply_patches
    from sft.adamw import FusedAdamW, clip_grad_norm
    from sft.host_syncs import record_host_syncs
    from sft.collate import PackedCollator, pack_examples
    from sft.model import load_model, load_tokenizer
    from sft.trainer import SFTTrainer, fused_adamw_setup, prepare_training_args

    tokenizer = load_tokenizer("tiny")
    rng = random.Random(0)
    examples = [{"input_ids": (ids := [rng.randrange(1000, 5000) for _ in range(n)]), "labels": ids}
                for n in [rng.randrange(20, 250) for _ in range(60)]]
    rows = pack_examples(examples, 256)
    collate = PackedCollator(pad_token_id=tokenizer.pad_token_id)

    def patched_model():
        model = load_model("tiny", dtype=torch.bfloat16, seed=0).cuda()
        applied = apply_patches(model, device="cuda", recompute_experts="auto", tokens_per_micro_batch=512)
        assert applied["liger"] and applied["moe_kernel"] == "scattermoe" and not applied["recompute_experts"], applied
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model.train()

    model = patched_model()
    optimizer = FusedAdamW(model.parameters(), lr=1e-4)
    batches = [{k: v.pin_memory().cuda(non_blocking=True) if torch.is_tensor(v) else v
                for k, v in collate(rows[i:i + 2]).items()} for i in range(0, 8, 2)]
    def step(batch):
        loss = model(**batch).loss
        loss.backward()
        clip_grad_norm(list(model.parameters()), 1.0, optimizer)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    assert torch.isfinite(step(batches[0]))  # warm-up: Triton compilation and autotuning synchronize
    torch.cuda.synchronize()
    sites = record_host_syncs(lambda: step(batches[1]))
    assert sites, "Liger's fused cross-entropy syncs: none found means sync debugging saw nothing"
    outside_liger = {site: n for site, n in sites.items() if not any("liger_kernel" in frame for frame in site)}
    assert not outside_liger, outside_liger

    args = TrainingArguments(output_dir=tempfile.mkdtemp(), max_steps=6, learning_rate=1e-4, bf16=True,
                             per_device_train_batch_size=2, report_to=[], save_strategy="no", logging_steps=2,
                             gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
    prepare_training_args(args)
    assert args.accelerator_config.non_blocking
    trainer = SFTTrainer(model=patched_model(), args=args, train_dataset=rows, processing_class=tokenizer,
                         data_collator=collate, optimizer_cls_and_kwargs=fused_adamw_setup(args))
    trainer.train()
    assert type(trainer.optimizer.optimizer).__name__ == "FusedAdamW"
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 3 and all(loss == loss for loss in losses), losses
    print("ok")
""")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="train.py's GPU stack (Triton kernels, CUDA sync debug)")
def test_gpu_step_syncs_only_in_liger_and_the_trainer_trains():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))  # keep the site's
    proc = subprocess.run([sys.executable, "-c", CHECK], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]

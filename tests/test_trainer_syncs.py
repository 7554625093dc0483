"""SFTTrainer's step without host syncs (sft/trainer.py): the same logs as the stock Trainer, and no sync on a GPU.

CPU: SFTTrainer and the stock Trainer train the tiny model on the same packed rows, with a NaN loss injected at one
step: the logged losses (the NaN replaced by the mean since the last log, the Trainer's `logging_nan_inf_filter`
rule), the logged input-token counts and the final state agree, for every token-count mode.
GPU: train.py's stack on the tiny model (our experts, Liger with our fused cross-entropy, varlen attention, our
AdamW, pinned batches copied asynchronously): three whole steps between two logging steps run under
`torch.cuda.set_sync_debug_mode("error")`, so any host sync in them fails the run.
"""
import os
import random
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from sft.collate import PackedCollator, pack_examples
from sft.model import load_model
from sft.trainer import SFTTrainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def packed_rows(pad_token_id: int):
    """Rows with some pad-token ids inside documents, so that non-padding counting differs from counting all."""
    rng = random.Random(0)
    examples = []
    for n in (40, 25, 60, 33, 50, 45, 38, 52, 29, 61, 44, 35):
        ids = [rng.randrange(1000, 5000) if rng.random() > 0.1 else pad_token_id for _ in range(n)]
        examples.append({"input_ids": ids, "labels": ids})
    return pack_examples(examples, 64)


class NanAtStep:
    """compute_loss returns NaN (with finite gradients) at one optimizer step."""
    nan_step = 3

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        return loss + float("nan") if self.state.global_step == self.nan_step else loss


class StockWithNan(NanAtStep, Trainer):
    pass


class OursWithNan(NanAtStep, SFTTrainer):
    pass


def train(trainer_class, tokenizer, tmp_path, mode):
    model = load_model("tiny", dtype=torch.float32, seed=0)
    args = TrainingArguments(output_dir=str(tmp_path / trainer_class.__name__ / mode), max_steps=6, learning_rate=1e-3,
                             per_device_train_batch_size=1, lr_scheduler_type="constant", report_to=[], use_cpu=True,
                             save_strategy="no", logging_steps=2, seed=0, remove_unused_columns=False,
                             dataloader_pin_memory=False, include_num_input_tokens_seen=mode)
    trainer = trainer_class(model=model, args=args, train_dataset=packed_rows(tokenizer.pad_token_id),
                            data_collator=PackedCollator(pad_token_id=tokenizer.pad_token_id),
                            processing_class=tokenizer)
    trainer.train()
    logs = [{k: v for k, v in log.items() if k in ("loss", "num_input_tokens_seen", "step")}
            for log in trainer.state.log_history]
    return logs, trainer.state.num_input_tokens_seen, trainer.args.logging_nan_inf_filter


@pytest.mark.parametrize("mode", ["non_padding", "all"])
def test_same_logs_as_the_stock_trainer_with_a_nan_loss(tokenizer, tmp_path, mode):
    stock_logs, stock_tokens, _ = train(StockWithNan, tokenizer, tmp_path, mode)
    ours_logs, ours_tokens, trainer_filter = train(OursWithNan, tokenizer, tmp_path, mode)
    assert trainer_filter is False  # the Trainer's own host-side filter is off, ours replaced it
    assert ours_tokens == stock_tokens > 0
    assert len(ours_logs) == len(stock_logs) >= 3
    for ours, stock in zip(ours_logs, stock_logs):
        assert ours.keys() == stock.keys() and ours.get("num_input_tokens_seen") == stock.get("num_input_tokens_seen")
        if "loss" in stock:
            assert ours["loss"] == pytest.approx(stock["loss"], rel=1e-6), (ours_logs, stock_logs)
    losses = [log["loss"] for log in stock_logs if "loss" in log]
    assert all(loss == loss for loss in losses)  # the NaN step was filtered (NaN != NaN)
    if mode == "non_padding":  # the pad-token ids inside the documents are not counted
        all_tokens = train(SFTTrainer, tokenizer, tmp_path, "all")[1]
        assert ours_tokens < all_tokens


def test_unfiltered_nan_still_reaches_the_log(tokenizer, tmp_path):
    """--logging_nan_inf_filter false: the NaN is logged, as by the stock Trainer."""
    class Unfiltered(OursWithNan):
        def __init__(self, *args, **kwargs):
            kwargs["args"].logging_nan_inf_filter = False
            super().__init__(*args, **kwargs)

    logs = train(Unfiltered, tokenizer, tmp_path, "non_padding")[0]
    assert any(log.get("loss") != log.get("loss") for log in logs)


GPU_CHECK = textwrap.dedent("""
    import random, tempfile
    import torch
    from transformers import TrainerCallback, TrainingArguments
    from monkey_patch import apply_patches
    from sft.collate import PackedCollator, pack_examples
    from sft.model import load_model, load_tokenizer
    from sft.trainer import SFTTrainer, fused_adamw_setup, prepare_training_args

    class SyncsAreErrors(TrainerCallback):
        # From the end of step 2 to the end of step 5: steps 3-5 whole, with their batch fetches; no log in between.
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
            elif state.global_step == 5:
                torch.cuda.set_sync_debug_mode(0)
                print("steps 3-5 ran without a host sync")

    tokenizer = load_tokenizer("tiny")
    rng = random.Random(0)
    examples = [{"input_ids": (ids := [rng.randrange(1000, 5000) for _ in range(n)]), "labels": ids}
                for n in [rng.randrange(20, 250) for _ in range(60)]]
    rows = pack_examples(examples, 256)
    model = load_model("tiny", dtype=torch.bfloat16, seed=0)
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), max_steps=8, learning_rate=1e-4, bf16=True,
                             per_device_train_batch_size=2, report_to=[], save_strategy="no", logging_steps=6,
                             gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
                             max_grad_norm=1.0)
    prepare_training_args(args)
    applied = apply_patches(model, device="cuda")
    assert applied["ce_kernel"] == "ours" and applied["liger"], applied
    trainer = SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer,
                         data_collator=PackedCollator(pad_token_id=tokenizer.pad_token_id),
                         optimizer_cls_and_kwargs=fused_adamw_setup(args), callbacks=[SyncsAreErrors()])
    trainer.train()
    assert type(trainer.optimizer.optimizer).__name__ == "FusedAdamW"
    assert trainer.state.num_input_tokens_seen > 0
    print("ok")
""")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs are a GPU's (torch.cuda.set_sync_debug_mode)")
def test_gpu_steps_between_logs_have_no_host_sync():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))  # keep the site's
    proc = subprocess.run([sys.executable, "-c", GPU_CHECK], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]

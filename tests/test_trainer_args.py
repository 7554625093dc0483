"""sft.trainer.prepare_training_args: the Trainer settings the pipeline relies on."""
import pytest
from transformers import TrainingArguments

from sft.trainer import prepare_training_args


@pytest.mark.parametrize("pin_memory", [True, False])
def test_batches_copy_asynchronously_when_pinned(tmp_path, pin_memory):
    """A blocking copy of each batch would wait for the previous step's optimizer kernels (sft/trainer.py); with
    pinning off an asynchronous copy is not possible and the setting is left alone."""
    args = TrainingArguments(output_dir=str(tmp_path), dataloader_pin_memory=pin_memory, report_to=[])
    prepare_training_args(args)
    assert args.accelerator_config.non_blocking is pin_memory
    assert args.remove_unused_columns is False and args.include_num_input_tokens_seen == "non_padding"


def test_adamw_kernel_choice(tmp_path):
    """auto picks our AdamW kernel only where it runs (CUDA, unsharded, not fp16, torch's AdamW asked for); an explicit
    `ours` elsewhere fails before the model loads, naming the flag and why."""
    from monkey_patch.errors import PatchError
    from sft.trainer import resolve_adamw_kernel

    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    assert resolve_adamw_kernel("auto", args, None) is False  # a CPU run
    assert resolve_adamw_kernel("torch", args, None) is False
    with pytest.raises(PatchError, match="--adamw_kernel ours.*CUDA kernel"):
        resolve_adamw_kernel("ours", args, None)
    with pytest.raises(PatchError, match="deepspeed shards the parameters"):
        resolve_adamw_kernel("ours", args, "deepspeed")
    with pytest.raises(PatchError, match="choose auto, ours or torch"):
        resolve_adamw_kernel("fast", args, None)

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

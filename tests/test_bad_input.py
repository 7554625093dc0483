"""Bad input stops with an error that names the file, row or flag and says how to fix it; nothing is dropped silently."""
import json
import subprocess
import sys

import pytest
import torch

from sft.data import DataError, load_conversations
from tests.conftest import REPO_ROOT, write_jsonl

GOOD = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}


def error_of(*args, **kwargs) -> str:
    with pytest.raises(DataError) as caught:
        load_conversations(*args, **kwargs)
    return str(caught.value)


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + '{"messages": [oops\n')
    assert f"{path}:line 3: malformed JSON" in error_of([str(path)])


def test_malformed_json_file_names_the_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n {"prompt": "a", "completion": "b"},\n {"prompt": \n]')
    assert f"{path}:line 4: malformed JSON" in error_of([str(path)])


def test_missing_field_names_row_and_field(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "x", "output": "y"}, {"instruction": "only"}])
    message = error_of([str(path)])
    assert f"{path}:line 2: missing field 'output'" in message and "--skip_bad_rows" in message


def test_bad_turn_names_the_turn(tmp_path):
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "robot", "content": "a"}]}
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, row])
    assert "line 2: messages[1] has role 'robot'" in error_of([str(path)])


def test_no_assistant_turn(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "q"}]}])
    assert "no assistant turn" in error_of([str(path)])


def test_empty_dataset(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    assert f"{path}: the data set is empty" in error_of([str(path)])


def test_unknown_format_lists_the_fields(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])
    message = error_of([str(path)])
    assert "cannot tell the data format from fields ['answer', 'question']" in message and "--data_format" in message


def test_missing_file_and_unsupported_type(tmp_path):
    assert "no such file" in error_of([str(tmp_path / "nope.jsonl")])
    (tmp_path / "d.csv").write_text("a,b\n")
    assert "unsupported type .csv" in error_of([str(tmp_path / "d.csv")])


def test_skip_bad_rows_counts_what_it_skips(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, {"messages": "not a list"}, GOOD, {"messages": []}])
    loaded = load_conversations([str(path)], skip_bad_rows=True)
    assert (len(loaded.messages), loaded.skipped_rows) == (2, 2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_cli_names_a_flag_this_machine_cannot_run(tmp_path):
    run = subprocess.run([sys.executable, "train.py", "--liger", "true", "--output_dir", str(tmp_path)],
                         cwd=REPO_ROOT, capture_output=True, text=True)
    assert run.returncode == 2 and "error: --liger true needs a CUDA GPU" in run.stderr, run.stderr[-2000:]


def test_cli_exits_non_zero_with_the_error_on_stderr(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "x", "output": "y"}, {"instruction": "only"}])
    run = subprocess.run([sys.executable, "train.py", "--dataset", str(path), "--output_dir", str(tmp_path / "out")],
                         cwd=REPO_ROOT, capture_output=True, text=True)
    assert run.returncode == 2
    assert f"error: {path}:line 2: missing field 'output'" in run.stderr


@pytest.mark.parametrize("flag", ["--profile_steps", "--profile_warmup_steps"])
def test_negative_step_counts_are_named(flag):
    from sft.arguments import parse_arguments
    with pytest.raises(SystemExit, match=f"{flag} -1: a number of steps, 0 or more"):
        parse_arguments([flag, "-1"])


def test_cli_refuses_kept_experts_with_another_kernel_before_loading(tmp_path):
    run = subprocess.run([sys.executable, "train.py", "--recompute_experts", "false", "--moe_kernel", "grouped_mm",
                          "--output_dir", str(tmp_path)], cwd=REPO_ROOT, capture_output=True, text=True)
    assert run.returncode == 2 and "error: --recompute_experts false is implemented for our experts kernel" in run.stderr
    assert "parameters on" not in run.stdout  # refused before the model was loaded

"""Each data format becomes the same chat messages; the loss mask covers exactly the assistant turns."""
import pytest

from sft.data import detect_format, load_conversations, to_messages
from sft.render import IGNORE_INDEX, render, tokenize_conversations
from tests.conftest import write_jsonl

EXPECTED = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 2 and 3."},
            {"role": "assistant", "content": "5"}]

ROWS = {  # the same conversation in every supported format
    "alpaca": {"system": "Be brief.", "instruction": "Add 2 and 3.", "output": "5"},
    "messages": {"messages": EXPECTED},
    "sharegpt": {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Add 2 and 3."},
                                   {"from": "gpt", "value": "5"}]},
}


@pytest.mark.parametrize("data_format", sorted(ROWS))
def test_each_format_gives_the_same_messages(data_format, tmp_path):
    assert detect_format(ROWS[data_format], "row") == data_format
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS[data_format]] * 3)
    loaded = load_conversations([str(path)])
    assert loaded.messages == [EXPECTED] * 3 and loaded.skipped_rows == 0


def test_prompt_completion_and_alpaca_input(tmp_path):
    assert to_messages({"prompt": "Hi", "completion": "Hello"}, "prompt_completion", "r") == [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    alpaca = to_messages({"instruction": "Sum:", "input": "1 2", "output": "3"}, "alpaca", "r")
    assert alpaca[0] == {"role": "user", "content": "Sum:\n\n1 2"}


def test_json_parquet_and_arrow_files(tmp_path):
    import datasets
    import json
    rows = [ROWS["messages"]] * 2
    (tmp_path / "d.json").write_text(json.dumps(rows))
    table = datasets.Dataset.from_list([{"prompt": "Hi", "completion": "Yo"}] * 2)
    table.to_parquet(str(tmp_path / "d.parquet"))
    arrow_dir = tmp_path / "arrow"
    table.save_to_disk(str(arrow_dir))
    arrow_file = next(arrow_dir.glob("*.arrow"))
    loaded = load_conversations([str(tmp_path / "d.json"), str(tmp_path / "d.parquet"), str(arrow_file)])
    assert len(loaded.messages) == 6 and loaded.messages[-1][-1] == {"role": "assistant", "content": "Yo"}


def trained_text(tokenizer, example) -> list[str]:
    """The decoded runs of consecutive trained tokens."""
    runs, current = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs + ([tokenizer.decode(current)] if current else [])


def test_loss_mask_is_exactly_the_assistant_turns(tokenizer):
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "first question"},
                {"role": "assistant", "content": "first answer"}, {"role": "user", "content": "second"},
                {"role": "assistant", "content": "second answer, with 12 digits"}]
    example = render(tokenizer, messages)
    # Qwen3's template drops <think> blocks from earlier turns and emits an empty one in the last turn.
    assert trained_text(tokenizer, example) == [
        "first answer<|im_end|>", "<think>\n\n</think>\n\nsecond answer, with 12 digits<|im_end|>"]
    text = tokenizer.decode(example["input_ids"])
    assert text == tokenizer.apply_chat_template(messages, tokenize=False)


def test_train_on_everything(tokenizer):
    example = render(tokenizer, EXPECTED, assistant_only_loss=False)
    assert example["labels"] == example["input_ids"]


def test_truncation_and_drops_are_counted(tokenizer):
    short = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    long_answer = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "word " * 200}]
    long_prompt = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "a"}]
    result = tokenize_conversations(tokenizer, [short, long_answer, long_prompt], max_seq_length=64)
    # long_answer: truncated but keeps trained tokens; long_prompt: truncated and nothing trained is left -> dropped.
    assert (result.truncated, result.dropped, len(result.examples)) == (2, 1, 2)
    assert all(len(e["input_ids"]) <= 64 for e in result.examples)

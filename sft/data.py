"""SFT data: read files or hub datasets, check every row, turn each into chat messages.

Formats (detected per file from the first row's fields, or named with --data_format):
  alpaca             {"instruction", "input"?, "output", "system"?}
  messages           {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
  sharegpt           {"conversations": [{"from": "system"|"human"|"user"|"gpt"|"assistant", "value": str}, ...]}
  prompt_completion  {"prompt": str, "completion": str}

A malformed file or row stops the run with an error that names the file and the row (1-based line numbers for JSON
lines, 0-based row indices otherwise) and says how to fix it; `skip_bad_rows` skips such rows and logs the count.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

FORMATS = ("alpaca", "messages", "sharegpt", "prompt_completion")
LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet", ".arrow")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class DataError(ValueError):
    """Bad input data; the message names the file and row and says how to fix it."""


@dataclass
class Conversations:
    """Validated conversations of all datasets, with the count of rows skipped by `skip_bad_rows`."""
    messages: list[list[dict]] = field(default_factory=list)
    skipped_rows: int = 0


def read_rows(source: str, split: str = "train") -> tuple[list, list[str]]:
    """Rows of a local file or a hub dataset, and where each row is ("file:line 3", "file:row 2") for errors."""
    if os.path.isdir(source):
        raise DataError(f"{source}: is a directory; pass the data files themselves ({', '.join(LOCAL_SUFFIXES)})")
    suffix = os.path.splitext(source)[1].lower()
    if suffix in LOCAL_SUFFIXES:
        if not os.path.exists(source):
            raise DataError(f"{source}: no such file; check the --dataset path")
        if suffix == ".jsonl":
            return _read_json_lines(source)
        if suffix == ".json":
            rows = _read_json(source)
        else:
            import datasets
            rows = list(datasets.Dataset.from_parquet(source) if suffix == ".parquet"
                        else datasets.Dataset.from_file(source))
        return rows, [f"{source}:row {i}" for i in range(len(rows))]
    if os.path.exists(source) or not _looks_like_hub_id(source):
        raise DataError(f"{source}: no such file or unsupported type {suffix or '(none)'}; local data files end in "
                        f"{', '.join(LOCAL_SUFFIXES)}, hub datasets are named owner/name")
    rows = _read_hub(source, split)
    return rows, [f"{source}[{split}]:row {i}" for i in range(len(rows))]


def _looks_like_hub_id(source: str) -> bool:
    return source.count("/") == 1 and not source.startswith((".", "/"))


def _read_json_lines(path: str) -> tuple[list, list[str]]:
    rows, where = [], []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue  # blank lines (often a trailing one) carry no row
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:line {number}: malformed JSON ({error.msg} at column {error.colno}); "
                                "each line of a .jsonl file must be one JSON object") from None
            where.append(f"{path}:line {number}")
    return rows, where


def _read_json(path: str) -> list:
    with open(path, encoding="utf-8") as file:
        text = file.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}:line {error.lineno}: malformed JSON ({error.msg} at column {error.colno}); a .json "
                        "file holds one list of objects (use .jsonl for one object per line)") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: a .json data file must hold a list of objects (or {{\"data\": [...]}}), "
                        f"got {type(data).__name__}")
    return data


def _read_hub(dataset_id: str, split: str) -> list[dict]:
    import datasets
    try:
        return list(datasets.load_dataset(dataset_id, split=split))
    except Exception as error:  # datasets raises many types (network, missing split, missing repo)
        raise DataError(f"{dataset_id}: not a local file, and loading it as a hub dataset (split {split!r}) failed: "
                        f"{type(error).__name__}: {error}. Check the path, or the id and --dataset_split "
                        "(hub datasets need network access).") from None


def detect_format(row: dict, where: str) -> str:
    keys = set(row) if isinstance(row, dict) else set()
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    raise DataError(f"{where}: cannot tell the data format from fields {sorted(keys)}; expected one of: "
                    "messages, conversations (sharegpt), instruction+output (alpaca), prompt+completion. "
                    "Rename the fields or pass --data_format.")


def _text(row: dict, key: str, where: str, required: bool = True) -> str:
    value = row.get(key)
    if value is None:
        if required:
            raise DataError(f"{where}: missing field {key!r}")
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def _turns(row: dict, where: str, list_key: str, role_key: str, content_key: str, roles: dict) -> list[dict]:
    turns = row.get(list_key)
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: field {list_key!r} must be a non-empty list of turns")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or role_key not in turn or content_key not in turn:
            raise DataError(f"{where}: {list_key}[{i}] must be an object with {role_key!r} and {content_key!r}")
        if turn[role_key] not in roles:
            raise DataError(f"{where}: {list_key}[{i}] has {role_key} {turn[role_key]!r}; expected one of "
                            f"{sorted(roles)}")
        if not isinstance(turn[content_key], str):
            raise DataError(f"{where}: {list_key}[{i}].{content_key} must be a string")
        messages.append({"role": roles[turn[role_key]], "content": turn[content_key]})
    return messages


def to_messages(row: dict, data_format: str, where: str) -> list[dict]:
    """One row as chat messages; raises DataError naming `where` and the field when the row is malformed."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    if data_format == "alpaca":
        user = _text(row, "instruction", where)
        extra = _text(row, "input", where, required=False)
        messages = [{"role": "user", "content": f"{user}\n\n{extra}" if extra else user},
                    {"role": "assistant", "content": _text(row, "output", where)}]
        system = _text(row, "system", where, required=False)
        messages = ([{"role": "system", "content": system}] if system else []) + messages
    elif data_format == "messages":
        roles = {r: r for r in ("system", "user", "assistant")}
        messages = _turns(row, where, "messages", "role", "content", roles)
    elif data_format == "sharegpt":
        messages = _turns(row, where, "conversations", "from", "value", SHAREGPT_ROLES)
    elif data_format == "prompt_completion":
        messages = [{"role": "user", "content": _text(row, "prompt", where)},
                    {"role": "assistant", "content": _text(row, "completion", where)}]
    else:
        raise DataError(f"unknown --data_format {data_format!r}; choose one of {', '.join(FORMATS)}")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the conversation has no assistant turn, so nothing would be trained")
    return messages


def load_conversations(sources: list[str], data_format: str = "auto", split: str = "train",
                       skip_bad_rows: bool = False) -> Conversations:
    """All rows of all `sources` as validated chat messages."""
    result = Conversations()
    for source in sources:
        rows, where = read_rows(source, split)
        if not rows:
            raise DataError(f"{source}: the data set is empty; add rows or remove it from --dataset")
        row_format = data_format if data_format != "auto" else detect_format(rows[0], where[0])
        skipped_here = 0
        for row, location in zip(rows, where):
            try:
                result.messages.append(to_messages(row, row_format, location))
            except DataError as error:
                if not skip_bad_rows:
                    raise DataError(f"{error} (format {row_format}); fix the row or pass --skip_bad_rows") from None
                skipped_here += 1
                logger.warning("skipping bad row: %s", error)
        result.skipped_rows += skipped_here
        logger.info("%s: %d rows, format %s, %d skipped as bad", source, len(rows), row_format, skipped_here)
    if not result.messages:
        raise DataError(f"no usable rows in {', '.join(sources)} ({result.skipped_rows} skipped as bad)")
    return result

"""The formats people fine-tune from, read into one shape of example.

Every source row becomes one example with the columns the later stages read:
- `prompt`: the user's message the model answers (a chat's last user turn, an instruction with its
  input, or the mapped prompt column);
- `response`: the answer it learns (the last assistant turn, the output, the mapped column);
- `context`: the turns before the prompt (a system message, earlier user/assistant turns) as JSON
  text, None for a single-turn example;
- `slice`: what the eval report breaks metrics down by (optional: a mapped column, else absent);
- `split`: `train` or `eval` when the source says (its `test`, `validation`, ... mean eval).

Formats: `columns` (any columns, mapped by name), `chat` (`{"messages": [{"role", "content"}]}`),
`instruction` (`instruction`, `input`, `output`); `auto` picks by the columns present. A row whose
format is broken (no assistant turn, an unknown role, empty content, turns out of order) keeps all
its columns and gets `_format_error`, which validation turns into a quarantine reason; the source's
own columns stay beside the derived ones, so a quarantined row is stored as the source held it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pandas as pd

FORMATS = ("auto", "columns", "chat", "instruction")
ROLES = ("system", "user", "assistant")
EXAMPLE_COLUMNS = ("prompt", "response", "context", "slice", "split")
# What a source's split names mean here: its held-out splits are the eval split.
SPLIT_NAMES = {"train": "train", "training": "train", "eval": "eval", "evaluation": "eval",
               "test": "eval", "validation": "eval", "valid": "eval", "dev": "eval"}


class FormatError(ValueError):
    """The format or column mapping cannot apply to this source; the message names the setting."""


@dataclass(frozen=True)
class ColumnMapping:
    """Which source column holds each part of an example (raw_examples.columns)."""

    prompt: str = field(default="prompt", metadata={
        "help": "Column of the user's message (columns format)."})
    response: str = field(default="response", metadata={
        "help": "Column of the answer to learn (columns format)."})
    slice: str = field(default="intent", metadata={
        "help": "Column the eval report breaks metrics down by; optional: a source without it has "
        "one slice, 'all'."})
    split: str = field(default="split", metadata={
        "help": "Column naming each row's split (train; test/validation/eval mean eval); optional."})
    messages: str = field(default="messages", metadata={"help": "Column of the turns (chat format)."})


def detect_format(columns: list[str], mapping: ColumnMapping) -> str:
    """`chat` when the messages column is there, `instruction` for instruction/output, else `columns`."""
    if mapping.messages in columns:
        return "chat"
    if "instruction" in columns and "output" in columns and mapping.prompt not in columns:
        return "instruction"
    return "columns"


def to_examples(frame: pd.DataFrame, format: str, mapping: ColumnMapping) -> pd.DataFrame:
    """The source frame with the example columns added (see the module doc); `frame.attrs`
    records the format used and where each example column came from."""
    if format not in FORMATS:
        raise FormatError(f"raw_examples.format {format!r} is not one of {', '.join(FORMATS)}")
    source_columns = [c for c in frame.columns if not c.startswith("_")]
    used = detect_format(source_columns, mapping) if format == "auto" else format
    frame = frame.copy(deep=False)
    origins: dict[str, str] = {}
    if used == "columns":
        for name in ("prompt", "response"):
            column = getattr(mapping, name)
            if column in frame.columns and column != name:
                if name in frame.columns:
                    raise FormatError(f"raw_examples.columns.{name} maps {column!r} to {name!r}, "
                                      f"but the source has a {name!r} column too: map it as well or "
                                      "rename one")
                frame[name] = frame[column]
            origins[name] = column
    elif used == "chat":
        if mapping.messages not in frame.columns:
            raise FormatError(f"raw_examples.format is chat but the source has no {mapping.messages!r} "
                              f"column (raw_examples.columns.messages); its columns: {source_columns}")
        parsed = [parse_chat(value) for value in frame[mapping.messages].to_numpy(dtype=object)]
        frame["prompt"], frame["response"], frame["context"], frame["_format_error"] = (
            list(column) for column in zip(*parsed, strict=True)) if parsed else ([], [], [], [])
        origins.update(prompt=f"{mapping.messages}: last user turn",
                       response=f"{mapping.messages}: last assistant turn")
    elif used == "instruction":
        parsed = [parse_instruction(*values) for values in zip(
            *(frame[c].to_numpy(dtype=object) if c in frame.columns else [None] * len(frame)
              for c in ("instruction", "input", "output")), strict=True)]
        frame["prompt"], frame["response"], frame["_format_error"] = (
            list(column) for column in zip(*parsed, strict=True)) if parsed else ([], [], [])
        origins.update(prompt="instruction + input", response="output")
    if mapping.slice in frame.columns:
        values = frame[mapping.slice]
        # Slice names as text (a numeric category column too); a text column as it is (1M rows:
        # the type scan takes 10 ms, the conversion 150).
        frame["slice"] = values if pd.api.types.infer_dtype(values, skipna=True) in ("string", "empty") \
            else values.where(values.isna(), values.astype(str))
        origins["slice"] = mapping.slice
    if mapping.split in frame.columns:
        frame["split"] = normalize_split(frame[mapping.split])
        origins["split"] = mapping.split
    frame.attrs = {"format": used, "origins": origins, "source_columns": source_columns}
    return frame


def normalize_split(values: pd.Series) -> pd.Series:
    """Split names as train/eval (case-insensitive aliases); missing stays missing, and an unknown
    name stays as it was so that validation quarantines it naming the value."""
    def one(value):
        if value is None or (isinstance(value, float) and pd.isna(value)):
            return None
        return SPLIT_NAMES.get(str(value).strip().lower(), value)

    return values.map(one)


def _turns(value) -> list | None:
    """A messages value as a list (JSON lists arrive as lists, Parquet/Arrow ones as arrays)."""
    if isinstance(value, list):
        return value
    if hasattr(value, "tolist") and not isinstance(value, str | bytes):
        return list(value.tolist())
    return None


def parse_chat(value) -> tuple[str | None, str | None, str | None, str | None]:
    """(prompt, response, context JSON, error) of one chat record: the last turn must be the
    assistant's (the target), the one before it the user's (the prompt); a system message may only
    open the conversation, and user and assistant turns alternate."""
    turns = _turns(value)
    if turns is None:
        return None, None, None, f"messages: expected a list of turns, got {type(value).__name__}"
    if not turns:
        return None, None, None, "messages: no turns"
    clean: list[dict] = []
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict):
            return None, None, None, f"messages[{index}]: expected an object with role and content"
        role, content = turn.get("role"), turn.get("content")
        if role not in ROLES:
            return None, None, None, (f"messages[{index}]: unknown role {role!r} "
                                      f"(expected one of {', '.join(ROLES)})")
        if not isinstance(content, str) or not content.strip():
            return None, None, None, f"messages[{index}] ({role}): empty content"
        clean.append({"role": role, "content": content})
    if not any(t["role"] == "assistant" for t in clean):
        return None, None, None, "messages: no assistant turn to learn from"
    out_of_order = turn_order_error([t["role"] for t in clean])
    if out_of_order:
        return None, None, None, out_of_order
    if clean[-1]["role"] != "assistant":
        return None, None, None, (f"messages[{len(clean) - 1}]: the conversation ends with a user "
                                  "turn; the last turn must be the assistant's answer to learn")
    context = clean[:-2]
    return (clean[-2]["content"], clean[-1]["content"],
            json.dumps(context, ensure_ascii=False) if context else None, None)


def turn_order_error(roles: list[str]) -> str | None:
    """Why a conversation's roles are out of order, or None: an optional system message first,
    then user and assistant turns alternating from the user's (training records and served
    requests alike)."""
    expected = "user"
    for index, role in enumerate(roles):
        if role == "system" and index == 0:
            continue
        if role != expected:
            after = roles[index - 1] if index else "the start"
            return (f"messages[{index}]: {role!r} after {after!r} (turns out of order: an optional "
                    "system message first, then user and assistant turns alternating)")
        expected = "assistant" if expected == "user" else "user"
    return None


def parse_instruction(instruction, input_, output) -> tuple[str | None, str | None, str | None]:
    """(prompt, response, error) of one instruction record: the prompt is the instruction, and its
    input after a blank line when there is one."""
    problems = []
    for name, value, required in (("instruction", instruction, True), ("input", input_, False),
                                  ("output", output, True)):
        missing = value is None or (isinstance(value, float) and pd.isna(value))
        if missing:
            if required:
                problems.append(f"{name}: value is missing")
        elif not isinstance(value, str):
            problems.append(f"{name}: expected text, got {type(value).__name__}")
        elif required and not value.strip():
            problems.append(f"{name}: empty")
    if problems:
        return None, None, "; ".join(problems)
    has_input = isinstance(input_, str) and input_.strip()
    prompt = f"{instruction}\n\n{input_}" if has_input else instruction
    return prompt, output, None


def context_messages(context: str | None) -> list[dict]:
    """The turns before the prompt, from an example's context column (JSON text or None)."""
    if context is None or (isinstance(context, float) and pd.isna(context)):
        return []
    return json.loads(context)

"""Pure tests of the validation rules (Great Expectations on pandas, no database)."""

import json

import pandas as pd
import pytest

from llmops_dagster.dataset.sources import read_source
from llmops_dagster.dataset.validation import (
    ValidationRules,
    as_text,
    assign_split,
    count_tokens,
    data_version,
    normalize_text,
    validate_examples,
)


def frame_of(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    frame.insert(0, "_row_number", range(1, len(frame) + 1))
    frame["_parse_error"] = None
    frame["_utf8_error"] = None
    return frame


GOOD = {"prompt": "Where is my order A12345?", "response": "It ships today.", "slice": "order_status"}


@pytest.mark.parametrize(
    ("bad_row", "reason"),
    [
        ({**GOOD, "prompt": None}, "prompt: value is missing"),
        ({**GOOD, "response": 42}, "response: expected text, got 42"),
        ({**GOOD, "prompt": "write to jane.doe@example.org now"}, "prompt: contains an e-mail address"),
        ({**GOOD, "response": "call +1 415-555-0199"}, "response: contains a phone number"),
        ({**GOOD, "prompt": "my card is 4111-1111-1111-1111"}, "prompt: contains a payment card number"),
        ({**GOOD, "response": " ".join(["word"] * 300)}, "response: 300 tokens, outside the bounds 1..256"),
        ({**GOOD, "prompt": "   "}, "prompt: 0 tokens, outside the bounds 1..128"),
        ({**GOOD, "split": "test"}, "split: 'test' is not one of 'train', 'eval'"),
    ],
)
def test_each_bad_row_gets_its_reason(bad_row, reason):
    rows = [GOOD | {"prompt": f"Where is my order A1234{i}?"} for i in range(5)] + [bad_row]
    report = validate_examples(frame_of(rows))
    assert report.rows_accepted == 5
    assert report.quarantined["row_number"].tolist() == [6]
    assert any(r.startswith(reason) for r in report.quarantined.iloc[0]["reasons"]), (
        report.quarantined.iloc[0]["reasons"]
    )


def test_order_numbers_and_prices_are_not_pii():
    rows = [GOOD, GOOD | {"prompt": "Is order A55555 for $24.99 shipped?", "response": "Yes, 3 days."}]
    assert validate_examples(frame_of(rows)).rows_quarantined == 0


def test_duplicates_keep_the_first_and_leakage_quarantines_the_eval_copy():
    rows = [
        GOOD | {"split": "train"},
        GOOD | {"split": "train"},
        {"prompt": "Reset my hub", "response": "Hold 10 s.", "slice": "reset", "split": "train"},
        {"prompt": "reset  MY hub", "response": "Hold it.", "slice": "reset", "split": "eval"},
    ]
    report = validate_examples(frame_of(rows))
    reasons = dict(zip(report.quarantined["row_number"], report.quarantined["reasons"], strict=True))
    assert reasons == {
        2: ["exact duplicate of row 1"],
        4: ["train/eval leakage: the prompt is also in the train split at row 3"],
    }
    assert report.rows_input == report.rows_accepted + report.rows_quarantined


def test_missing_required_column_quarantines_every_row_naming_it():
    frame = frame_of([{"prompt": "hi there", "slice": "greet"}] * 3)
    report = validate_examples(frame)
    assert report.missing_columns == ["response"]
    assert report.rows_accepted == 0 and report.rows_quarantined == 3
    assert report.quarantined.iloc[0]["reasons"][0] == "missing required column(s): 'response'"


def test_split_is_deterministic_and_follows_the_normalized_prompt():
    prompts = pd.Series([f"question number {i}" for i in range(2000)])
    first = assign_split(normalize_text(as_text(prompts)), 0.1)
    assert first.equals(assign_split(normalize_text(as_text(prompts)), 0.1))
    assert 0.07 < (first == "eval").mean() < 0.13
    same = assign_split(normalize_text(as_text(pd.Series(["Hello  World", "hello world"]))), 0.5)
    assert same.iloc[0] == same.iloc[1]


def test_token_count_is_nan_for_non_text():
    counts = count_tokens(pd.Series(["Hello, world!", 5, None]))
    assert counts.iloc[0] == 4 and counts.iloc[1:].isna().all()


def test_data_version_is_a_content_hash():
    rules = ValidationRules()
    a = validate_examples(frame_of([GOOD]), rules).accepted
    b = validate_examples(frame_of([GOOD]), rules).accepted
    c = validate_examples(frame_of([GOOD | {"response": "Other."}]), rules).accepted
    assert data_version(a) == data_version(b) != data_version(c)


def test_unreadable_rows_keep_their_original_bytes(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(
        json.dumps(GOOD).encode()
        + b"\n{broken\n"
        + b'{"prompt": "caf\xe9", "response": "x", "slice": "a"}\n'
    )
    report = validate_examples(read_source(path))
    by_row = {r.row_number: r for r in report.quarantined.itertuples()}
    assert set(by_row) == {2, 3}
    assert by_row[2].reasons[0].startswith("row could not be read: not valid JSON")
    assert json.loads(by_row[2].original_row) == {"_raw": "{broken"}
    assert by_row[3].reasons == ["not valid UTF-8: invalid UTF-8 byte(s) b'\\xe9' at byte offset 15"]
    assert "caf\\xe9" in json.loads(by_row[3].original_row)["_raw"]


def test_prompt_set_records_survive_unicode_line_breaks(tmp_path):
    from llmops_dagster.prompts.templates import read_records

    path = tmp_path / "train.jsonl"
    records = [{"prompt": "a\u2028b\x85c\x1cd", "completion": "e"}, {"prompt": "f", "completion": "g"}]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    assert read_records(path) == records

"""Reading every supported source kind from local files (no hub), without losing a row."""

import pandas as pd
import pytest

from llmops_dagster.dataset.sources import SourceError, read_source

ROWS = [
    {"prompt": "Where is order A10001?", "response": "On its way.", "slice": "order_status"},
    {"prompt": "Reset my hub", "response": "Hold the button.", "slice": "reset_device"},
]


def test_csv_rows_are_numbered_and_bad_bytes_located(tmp_path):
    path = tmp_path / "examples.csv"
    path.write_bytes(
        b"prompt,response,intent\n"
        b'"Where is order A10001?","On its way.",order_status\n'
        b'"multi\nline prompt","ok",x\n'
        b'"caf\xe9","ok",x\n'
        b'"short row"\n'
    )
    frame = read_source(path)
    assert frame["_row_number"].tolist() == [1, 2, 3, 4]
    assert frame.loc[1, "prompt"] == "multi\nline prompt"
    assert frame["_utf8_error"].notna().tolist() == [False, False, True, False]
    assert frame.loc[3, "_parse_error"] == "expected 3 fields, found 1"
    assert "caf\\xe9" in frame.loc[2, "_raw"]


def test_parquet_and_datasets_folder(tmp_path):
    import datasets

    pd.DataFrame(ROWS).to_parquet(tmp_path / "examples.parquet")
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    for source in (tmp_path / "examples.parquet", tmp_path / "saved"):
        frame = read_source(source)
        assert frame["prompt"].tolist() == [r["prompt"] for r in ROWS]
        assert frame["_row_number"].tolist() == [1, 2]


@pytest.mark.parametrize(
    ("name", "message"),
    [("missing.jsonl", "does not exist"), ("examples.xlsx", "has suffix '.xlsx'")],
)
def test_unreadable_source_names_the_setting(tmp_path, name, message):
    (tmp_path / "examples.xlsx").write_bytes(b"")
    with pytest.raises(SourceError, match=message) as error:
        read_source(tmp_path / name)
    assert "raw_examples source" in str(error.value)

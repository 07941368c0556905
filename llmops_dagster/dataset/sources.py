"""Reading raw examples from a file or folder without losing a single row.

Every reader returns a DataFrame with the source's own columns plus:
- `_row_number`: 1-based position in the source (line of a JSONL file, data row of a CSV file,
  record of a Parquet file or `datasets` folder), so every later message can name the row;
- `_parse_error`: why a row could not be read as a record (None when it could);
- `_utf8_error`: where a row held bytes that are not UTF-8 (None when it did not);
- `_raw`: the row exactly as read, escaped as text, only for rows with one of the two errors.

Text that is not valid UTF-8 is decoded with U+FFFD replacements so that the checks can run on it,
and `_raw` keeps the original bytes (as `\\xNN` escapes) for the quarantine table.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path

import pandas as pd

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
META_COLUMNS = ("_row_number", "_parse_error", "_utf8_error", "_raw")


class SourceError(ValueError):
    """The configured source cannot be read at all (missing, or of an unknown kind)."""


def _decode(raw: bytes) -> tuple[str, str | None]:
    """Decode UTF-8, returning the text and a description of the first invalid byte, if any."""
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as error:
        bad = raw[error.start : error.end]
        where = f"invalid UTF-8 byte(s) {bad!r} at byte offset {error.start}"
        return raw.decode("utf-8", errors="replace"), where


def _escaped(raw: bytes) -> str:
    return raw.decode("utf-8", errors="backslashreplace")


def read_jsonl(path: Path) -> pd.DataFrame:
    """One JSON object a line; blank lines are skipped, every other line becomes one row."""
    records: list[dict] = []
    with path.open("rb") as handle:
        for line_number, raw_line in enumerate(handle, start=1):
            raw_line = raw_line.rstrip(b"\r\n")
            if not raw_line.strip():
                continue
            text, utf8_error = _decode(raw_line)
            record: dict = {"_row_number": line_number, "_parse_error": None}
            try:
                parsed = json.loads(text)
                if isinstance(parsed, dict):
                    record.update({k: v for k, v in parsed.items() if not k.startswith("_")})
                else:
                    record["_parse_error"] = f"expected a JSON object, got {type(parsed).__name__}"
            except json.JSONDecodeError as error:
                record["_parse_error"] = f"not valid JSON: {error.msg} at column {error.colno}"
            record["_utf8_error"] = utf8_error
            bad = utf8_error or record["_parse_error"]
            record["_raw"] = _escaped(raw_line) if bad else None
            records.append(record)
    return pd.DataFrame.from_records(records)


def read_csv(path: Path) -> pd.DataFrame:
    """A CSV file with a header row; every value is read as text, empty cells as missing."""
    records: list[dict] = []
    raw_lines = path.read_bytes().splitlines(keepends=True)
    header_text, _ = _decode(raw_lines[0]) if raw_lines else ("", None)
    header = next(csv.reader([header_text]), [])
    if not header:
        raise SourceError(f"{path}: the CSV file has no header row")
    body_lines = raw_lines[1:]
    text, _ = _decode(b"".join(body_lines))
    # A CSV row may span several lines (a quoted field with a newline). The reader's line counter
    # tells which raw lines each row came from; U+FFFD replacement keeps line breaks one to one.
    reader = csv.reader(io.StringIO(text, newline=""))
    lines_before = 0
    for row_number, fields in enumerate(reader, start=1):
        raw_row = b"".join(body_lines[lines_before : reader.line_num])
        lines_before = reader.line_num
        _, utf8_error = _decode(raw_row)
        record: dict = {"_row_number": row_number, "_parse_error": None, "_utf8_error": utf8_error}
        if len(fields) != len(header):
            record["_parse_error"] = f"expected {len(header)} fields, found {len(fields)}"
        for name, value in zip(header, fields, strict=False):
            if not name.startswith("_"):
                record[name] = value if value != "" else None
        bad = utf8_error or record["_parse_error"]
        record["_raw"] = _escaped(raw_row.rstrip(b"\r\n")) if bad else None
        records.append(record)
    frame = pd.DataFrame.from_records(records)
    for name in header:
        if name not in frame.columns and not name.startswith("_"):
            frame[name] = None
    return frame


def _with_meta(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.copy()
    frame.insert(0, "_row_number", range(1, len(frame) + 1))
    frame["_parse_error"] = None
    frame["_utf8_error"] = None
    frame["_raw"] = None
    return frame


def read_source(source: str | Path) -> pd.DataFrame:
    """Read a JSONL, CSV or Parquet file; a folder of such files named by split (train.jsonl,
    test.parquet, train-00000-of-00001.parquet, ...); or a folder written by `datasets`
    `save_to_disk` (a Dataset, or a DatasetDict whose splits are kept). Rows from several splits
    carry the split's name in a `split` column (unless they have one of their own) and are
    numbered on through the splits in the order listed."""
    path = Path(source)
    if not path.exists():
        raise SourceError(f"raw_examples source {str(path)!r} does not exist")
    if path.is_dir():
        by_split = split_files(path)
        if by_split:
            return _concat_splits({split: pd.concat([read_file(f) for f in files], ignore_index=True)
                                   for split, files in by_split.items()})
        return _read_saved_dataset(path)
    return read_file(path)


def read_file(path: Path) -> pd.DataFrame:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return read_jsonl(path)
    if suffix == ".csv":
        return read_csv(path)
    if suffix == ".parquet":
        return _with_meta(pd.read_parquet(path))
    raise SourceError(
        f"raw_examples source {str(path)!r} has suffix {suffix!r}; "
        f"supported: {', '.join(SUPPORTED_SUFFIXES)} or a `datasets` folder"
    )


def split_files(folder: Path) -> dict[str, list[Path]]:
    """Data files of a folder (or its data/ subfolder, as on the Hugging Face hub) grouped by the
    split their name starts with; {} when the folder is a saved `datasets` dataset or has none."""
    from llmops_dagster.dataset.formats import SPLIT_NAMES

    if any((folder / marker).exists() for marker in ("dataset_dict.json", "dataset_info.json",
                                                     "state.json")):
        return {}
    files = [p for base in (folder, folder / "data") if base.is_dir() for p in sorted(base.iterdir())
             if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES]
    grouped: dict[str, list[Path]] = {}
    for file in files:
        split = file.stem.split("-", 1)[0].split(".", 1)[0].lower()
        if split not in SPLIT_NAMES:
            raise SourceError(f"raw_examples source {str(folder)!r}: file {file.name!r} is not named "
                              f"by a split ({', '.join(sorted(SPLIT_NAMES))}); name each file by its "
                              "split or point the source at one file")
        grouped.setdefault(split, []).append(file)
    return grouped


def _read_saved_dataset(path: Path) -> pd.DataFrame:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as error:
        raise SourceError(
            f"raw_examples source {str(path)!r} is a folder but neither a saved `datasets` dataset "
            f"nor data files named by split ({error})"
        ) from error
    if isinstance(loaded, datasets.DatasetDict):
        return _concat_splits({split: _with_meta(part.to_pandas()) for split, part in loaded.items()})
    return _with_meta(loaded.to_pandas())


def _concat_splits(parts: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One frame of every split's rows: `split` set where a row has none, `_row_number` counting on
    through the splits (the number a quarantine row is kept under)."""
    frames = []
    for split, part in parts.items():
        part = part.copy()
        if "split" not in part.columns:
            part["split"] = split
        else:
            part["split"] = part["split"].where(part["split"].notna(), split)
        frames.append(part)
    frame = pd.concat(frames, ignore_index=True)
    frame["_row_number"] = range(1, len(frame) + 1)
    return frame


def content_hash_of_path(path: Path) -> str:
    """SHA-256 of a file's bytes, or of a folder's files in name order (hex, 64 characters)."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode())
        with file.open("rb") as handle:
            for chunk in iter(lambda h=handle: h.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()

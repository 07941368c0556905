"""Raw examples: a byte-exact snapshot of the configured source, and reading it back."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd

from llmops_dagster.dataset.formats import ColumnMapping, to_examples
from llmops_dagster.dataset.sources import SourceError, read_source
from llmops_dagster.dataset.synthetic_data import generate_examples

SYNTHETIC = "synthetic"


def write_synthetic(path: Path, n_rows: int, seed: int) -> None:
    """The default dataset as JSONL, one example a line."""
    with path.open("w", encoding="utf-8") as handle:
        for row in generate_examples(n_rows=n_rows, seed=seed):
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def snapshot_source(source: str, dest_dir: Path, n_rows: int, seed: int) -> Path:
    """Copy the source (or write the synthetic set) into `dest_dir`; return the snapshot's path."""
    if not source or source == SYNTHETIC:
        target = dest_dir / f"synthetic-{n_rows}-seed{seed}.jsonl"
        write_synthetic(target, n_rows, seed)
        return target
    path = Path(source)
    if not path.exists():
        raise SourceError(f"raw_examples source {source!r} does not exist")
    target = dest_dir / path.name
    if path.is_dir():
        shutil.copytree(path, target)
    else:
        shutil.copy2(path, target)
    return target


def load_snapshot(path: str | Path) -> pd.DataFrame:
    return read_source(path)


def load_examples(path: str | Path, format: str = "auto", mapping: ColumnMapping | None = None
                  ) -> pd.DataFrame:
    """The snapshot's rows as examples (formats.to_examples): the source's own columns, and the
    prompt, response, context, slice and split read from them in `format`."""
    return to_examples(read_source(path), format, mapping or ColumnMapping())

"""Persisting a validation outcome: quarantined rows and the dataset version in PostgreSQL,
accepted rows as Parquet in the version's folder. Owns dataset_versions and quarantine_rows: every
SQL statement on them is here."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import sqlalchemy as sa

from llmops_dagster.dataset.validation import ValidationReport

ACCEPTED_FILE = "accepted.parquet"


FEEDBACK_SOURCE = "feedback"  # quarantine key of feedback examples: (feedback, feedback_id)


def with_feedback_examples(raw: pd.DataFrame, corrections: pd.DataFrame) -> pd.DataFrame:
    """The raw rows followed by people's corrections as examples (prompt, corrected response,
    the earlier turns when the answer was part of a conversation, slice), numbered after the raw
    rows and carrying their feedback_id for lineage."""
    if corrections.empty:
        return raw
    extra = pd.DataFrame({
        "prompt": corrections["prompt"].to_numpy(),
        "response": corrections["response"].to_numpy(),
        "context": corrections["context"].to_numpy() if "context" in corrections else None,
        "slice": corrections["slice"].to_numpy(),
        "feedback_id": corrections["feedback_id"].astype("Int64").to_numpy(),
        "_row_number": range(len(raw) + 1, len(raw) + len(corrections) + 1),
        "_parse_error": None,
        "_utf8_error": None,
    })
    combined = pd.concat([raw, extra], ignore_index=True)
    combined.attrs = raw.attrs  # the source's format and columns (see formats.to_examples)
    return combined


def save_quarantine(engine: sa.Engine, report: ValidationReport, input_hash: str, source: str,
                    run_id: str | None, raw_rows: int | None = None) -> int:
    """Insert every quarantined row with all its reasons; the same input twice adds nothing.
    Rows after the first `raw_rows` are feedback examples, keyed by their feedback id.

    Returns the number of rows this input has in quarantine afterwards.
    """
    rows = []
    for r in report.quarantined.itertuples(index=False):
        from_feedback = raw_rows is not None and r.row_number > raw_rows
        original = json.loads(r.original_row)
        rows.append({
            "input_hash": FEEDBACK_SOURCE if from_feedback else input_hash,
            "source": FEEDBACK_SOURCE if from_feedback else source,
            "row_number": int(original["feedback_id"]) if from_feedback else int(r.row_number),
            "reasons": json.dumps(list(r.reasons)),
            "original_row": r.original_row,
            "run_id": run_id,
        })
    with engine.begin() as connection:
        if rows:
            connection.execute(
                sa.text(
                    "INSERT INTO quarantine_rows "
                    "(input_hash, source, row_number, reasons, original_row, run_id) "
                    "VALUES (:input_hash, :source, :row_number, CAST(:reasons AS jsonb), "
                    ":original_row, :run_id) ON CONFLICT (input_hash, row_number) DO NOTHING"
                ),
                rows,
            )
        return connection.execute(
            sa.text("SELECT count(*) FROM quarantine_rows WHERE input_hash = :h"),
            {"h": input_hash},
        ).scalar_one()


def write_accepted(folder: Path, accepted: pd.DataFrame) -> None:
    accepted.to_parquet(folder / ACCEPTED_FILE, index=False)


def read_accepted(folder: str | Path) -> pd.DataFrame:
    return pd.read_parquet(Path(folder) / ACCEPTED_FILE)


def redact_accepted(folder: str | Path, feedback_ids: set[int]) -> pd.DataFrame:
    """Cut the examples made from `feedback_ids` out of a version's accepted rows, in place (the
    version keeps its name; the file is replaced atomically, 0600). Returns the rows cut
    (feedback_id, _row_number), none when the version holds none of them."""
    path = Path(folder) / ACCEPTED_FILE
    if not path.is_file():
        return pd.DataFrame({"feedback_id": [], "_row_number": []})
    accepted = pd.read_parquet(path)
    if "feedback_id" not in accepted:
        return pd.DataFrame({"feedback_id": [], "_row_number": []})
    cut = accepted["feedback_id"].isin(list(feedback_ids)).fillna(False).astype(bool)
    if cut.any():
        staging = path.with_name(f".{path.name}.{os.getpid()}")
        accepted[~cut].to_parquet(staging, index=False)
        os.chmod(staging, 0o600)
        os.replace(staging, path)
    return accepted.loc[cut, ["feedback_id", "_row_number"]]


def record_dataset_version(engine: sa.Engine, version: str, input_hash: str, source: str,
                           path: Path, report: ValidationReport) -> None:
    """Record the version; a correction purged while it was being made (after its rows were read)
    is cut from it first, as the purge would have (redaction.redact_purged)."""
    from llmops_dagster.feedback import redaction  # it builds on this module

    with engine.begin() as connection:
        redaction.redact_purged(connection, version, path)
        connection.execute(
            sa.text(
                "INSERT INTO dataset_versions (version, input_hash, source, path, rows_input, "
                "rows_accepted, rows_quarantined) VALUES (:version, :input_hash, :source, :path, "
                ":rows_input, :rows_accepted, :rows_quarantined) ON CONFLICT (version) DO NOTHING"
            ),
            {
                "version": version,
                "input_hash": input_hash,
                "source": source,
                "path": str(path),
                "rows_input": report.rows_input,
                "rows_accepted": report.rows_accepted,
                "rows_quarantined": report.rows_quarantined,
            },
        )


def version_paths(connection: sa.Connection) -> list[str]:
    """The folder of every recorded dataset version."""
    return connection.execute(sa.text("SELECT path FROM dataset_versions")).scalars().all()


@dataclass(frozen=True)
class DatasetVersion:
    """A validated dataset as dataset_versions records it: the hand-off to the assets built on it."""

    version: str
    source: str
    input_hash: str  # the raw snapshot's content hash
    path: str  # the version's folder (ACCEPTED_FILE inside)
    rows_input: int
    rows_accepted: int
    rows_quarantined: int


def recorded_dataset(connection: sa.Connection, version: str) -> DatasetVersion | None:
    """What the table records of dataset `version`, or None when it is not recorded."""
    row = connection.execute(
        sa.text("SELECT version, source, input_hash, path, rows_input, rows_accepted, "
                "rows_quarantined FROM dataset_versions WHERE version = :v"), {"v": version}
    ).mappings().first()
    return DatasetVersion(**row) if row is not None else None


def input_hash_of(engine: sa.Engine, version: str) -> str | None:
    """The raw snapshot's input hash behind dataset `version` (None: not recorded)."""
    with engine.connect() as connection:
        return connection.execute(
            sa.text("SELECT input_hash FROM dataset_versions WHERE version = :v"),
            {"v": version}).scalar()


def newest_quarantined(engine: sa.Engine, limit: int) -> list:
    """The newest `limit` quarantined rows: (source, row_number, reasons) each."""
    with engine.connect() as connection:
        return connection.execute(
            sa.text("SELECT source, row_number, reasons FROM quarantine_rows "
                    "ORDER BY quarantined_at DESC, row_number LIMIT :n"), {"n": limit}
        ).all()


def delete_feedback_quarantine(connection: sa.Connection, feedback_ids: list[int]) -> int:
    """Delete the quarantined copies of feedback examples `feedback_ids`; how many."""
    return connection.execute(
        sa.text("DELETE FROM quarantine_rows WHERE input_hash = :source AND row_number = ANY(:ids)"),
        {"source": FEEDBACK_SOURCE, "ids": feedback_ids}).rowcount


def quarantine_summary(report: ValidationReport, limit: int = 10) -> str:
    """A Markdown table of the first quarantined rows and their reasons."""
    if report.quarantined.empty:
        return "No row was quarantined."
    lines = ["| row | reasons |", "|---|---|"]
    for r in report.quarantined.head(limit).itertuples(index=False):
        reasons = "; ".join(r.reasons).replace("|", "\\|")
        lines.append(f"| {r.row_number} | {reasons} |")
    if report.rows_quarantined > limit:
        lines.append(f"| ... | {report.rows_quarantined - limit} more in quarantine_rows |")
    return "\n".join(lines)


@dataclass(frozen=True)
class QuarantineCheck:
    """The blocking gate on a validation outcome: a verdict and a message naming what failed."""

    passed: bool
    message: str


def quarantine_check(report: ValidationReport, max_share: float,
                     raw_rows: int | None = None) -> QuarantineCheck:
    """The blocking gate on the source's rows (the first `raw_rows`; all when None): feedback
    examples after them have a budget of their own (feedback_budget) and never count here."""
    if report.missing_columns:
        names = ", ".join(repr(c) for c in report.missing_columns)
        return QuarantineCheck(False, f"required column(s) {names} missing from the source; "
                                      f"all {report.rows_input} rows quarantined")
    rows = report.rows_input if raw_rows is None else raw_rows
    quarantined = report.quarantined
    if raw_rows is not None:
        quarantined = quarantined[quarantined["row_number"] <= raw_rows]
    share = len(quarantined) / rows if rows else 0.0
    if share > max_share:
        first = "; ".join(f"row {r.row_number}: {r.reasons[0]}" for r in quarantined.head(5).itertuples())
        return QuarantineCheck(
            False,
            f"{len(quarantined)} of {rows} source rows quarantined ({share:.1%}), "
            f"above the {max_share:.1%} threshold (max_quarantined_share). First: {first}",
        )
    return QuarantineCheck(
        True, f"{len(quarantined)} of {rows} source rows quarantined ({share:.1%}), "
              f"within the {max_share:.1%} threshold",
    )


@dataclass(frozen=True)
class FeedbackBudget:
    """The feedback examples' own quarantine budget: over it, every feedback example of this
    version is left out (training goes on with the source's rows) and the non-blocking check says so."""

    rows: int  # feedback examples validated
    quarantined: int
    max_share: float

    @property
    def share(self) -> float:
        return self.quarantined / self.rows if self.rows else 0.0

    @property
    def within(self) -> bool:
        return self.share <= self.max_share

    def message(self) -> str:
        verdict = ("within" if self.within else "above") + f" the {self.max_share:.1%} budget"
        outcome = "" if self.within else "; every feedback example is left out of this version"
        return (f"{self.quarantined} of {self.rows} feedback examples quarantined ({self.share:.1%}), "
                f"{verdict} (max_feedback_quarantined_share){outcome}")


def feedback_budget(report: ValidationReport, raw_rows: int, max_share: float) -> FeedbackBudget:
    """Quarantine of the feedback examples (rows after the first `raw_rows`) against their budget."""
    quarantined = int((report.quarantined["row_number"] > raw_rows).sum()) if report.rows_quarantined else 0
    return FeedbackBudget(rows=report.rows_input - raw_rows, quarantined=quarantined, max_share=max_share)


def checks_markdown(report: ValidationReport) -> str:
    lines = ["| check | column | failed rows |", "|---|---|---|"]
    lines += [f"| {c['check']} | {c['column']} | {c['failed_rows']} |" for c in report.checks]
    return "\n".join(lines)

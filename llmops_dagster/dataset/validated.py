"""The steps of a validated dataset version: the source's rows and people's accepted corrections
gathered into examples, validated, quarantined, and the feedback examples' own budget applied."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import sqlalchemy as sa

from llmops_dagster.dataset import dataset_store
from llmops_dagster.dataset.formats import ColumnMapping
from llmops_dagster.dataset.raw_data import load_examples
from llmops_dagster.dataset.validation import ValidationReport, ValidationRules, validate_examples
from llmops_dagster.feedback import curation


@dataclass(frozen=True)
class Examples:
    """The source's rows (`snapshot`), and the same followed by feedback examples (`frame`)."""

    snapshot: pd.DataFrame
    frame: pd.DataFrame


def gather_examples(engine: sa.Engine, raw: dict, max_feedback_rows: int) -> Examples:
    """The snapshot `raw` (raw_examples' metadata) names, read as it was read there, followed by
    the newest `max_feedback_rows` accepted corrections as examples."""
    snapshot = load_examples(raw["snapshot_path"], raw.get("format", "auto"),
                             ColumnMapping(**raw.get("columns", {})))
    corrections = curation.correction_examples(engine, max_rows=max_feedback_rows)
    return Examples(snapshot, dataset_store.with_feedback_examples(snapshot, corrections))


@dataclass(frozen=True)
class Validation:
    """What validation made of the examples: the report of the rows the version keeps, the
    feedback examples' budget, and the rows the quarantine table holds for this input."""

    report: ValidationReport
    budget: dataset_store.FeedbackBudget
    in_quarantine: int
    rows_from_feedback: int  # feedback examples validated into the report (0 over the budget)

    def counts(self) -> dict:
        """Rows in, accepted, quarantined and from feedback, as metadata entries."""
        report, budget = self.report, self.budget
        return {
            "rows_input": report.rows_input,
            "rows_from_feedback": self.rows_from_feedback,
            "feedback_examples_offered": budget.rows,
            "feedback_quarantined": budget.quarantined,
            "rows_accepted": report.rows_accepted,
            "rows_quarantined": report.rows_quarantined,
            "rows_in_quarantine_table": self.in_quarantine,
            "reconciles": report.rows_input == report.rows_accepted + report.rows_quarantined,
            "quarantined_share": round(report.quarantined_share, 4),
            "dagster/row_count": report.rows_accepted,
        }


def validate_and_quarantine(engine: sa.Engine, examples: Examples, rules: ValidationRules, raw: dict,
                            run_id: str | None, max_feedback_share: float) -> Validation:
    """Validate the examples and keep every rejected row in quarantine, feedback included,
    whatever the budget says; over the feedback budget, the version is the source's rows alone."""
    raw_rows = len(examples.snapshot)
    report = validate_examples(examples.frame, rules)
    budget = dataset_store.feedback_budget(report, raw_rows, max_feedback_share)
    in_quarantine = dataset_store.save_quarantine(
        engine, report, raw["input_hash"], raw["source"], run_id, raw_rows=raw_rows)
    frame = examples.frame
    if not budget.within:
        frame = examples.snapshot
        report = validate_examples(frame, rules)
    return Validation(report, budget, in_quarantine, rows_from_feedback=len(frame) - raw_rows)

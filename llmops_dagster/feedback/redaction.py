"""What a purge reaches beyond the feedback table: the files and rows made from the purged
corrections, and the model versions trained on them.

Purged feedback reaches training in one path: an accepted correction becomes an example of a
validated dataset version (datasets/<v>/accepted.parquet), which the prompt set renders into
prompt_sets/<v>/train.jsonl and eval.jsonl; its prompt is embedded for drift (dataset_embeddings)
and, when quarantined, kept with its reasons (quarantine_rows). The raw snapshot, the scratch base
model's tokenizer (trained on the source's rows only) and the fine-tune folders (weights, metrics,
configs) hold no feedback text.

A redaction rewrites each file without the purged examples: the version keeps its name (what was
trained on it stays traceable), redactions.json beside the files and a row of artifact_redactions
say what was cut, when, by whom and why (never the text). A model version cannot forget what it
learned: each one trained on a redacted version, or warm-started from an adapter that was, is
flagged in the registry (model_versions.purged_feedback), and so is one registered later from such
a version (registry_register).

Owns artifact_redactions. The statements on the other tables a purge reaches are their owners':
dataset_store.py, embeddings.py, templates.py, registry.py and traffic_log.py.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa

from llmops_dagster.dataset import dataset_store, embeddings
from llmops_dagster.governance import registry
from llmops_dagster.prompts import templates
from llmops_dagster.prompts.templates import SPLIT_FILES, read_records
from llmops_dagster.serving import traffic_log

REDACTIONS_FILE = "redactions.json"
FEEDBACK_SOURCE = dataset_store.FEEDBACK_SOURCE
DATASETS = "datasets"
PROMPT_SETS = "prompt_sets"


@dataclass(frozen=True)
class Redaction:
    """One artifact file rewritten without the examples of some purged feedback rows."""

    kind: str
    version: str
    path: str
    feedback_ids: list[int]
    rows_removed: int


@dataclass
class Outcome:
    """Everything one purge reached beyond the feedback rows themselves."""

    redactions: list[Redaction] = field(default_factory=list)
    flagged: dict[str, list[int]] = field(default_factory=dict)  # model version -> feedback ids
    quarantine_rows: int = 0  # quarantined copies of the purged examples deleted
    embeddings: int = 0  # drift-reference embeddings of their prompts deleted

    def details(self, feedback_id: int) -> dict:
        """What the purge of `feedback_id` reached, for its audit record (paths and versions only)."""
        return {"redacted": sorted(r.path for r in self.redactions if feedback_id in r.feedback_ids),
                "flagged_versions": sorted(v for v, ids in self.flagged.items() if feedback_id in ids)}

    def report_lines(self) -> list[str]:
        lines = [f"redacted {r.rows_removed} rows of feedback {', '.join(map(str, r.feedback_ids))} "
                 f"from {r.kind} {r.version}: {r.path}" for r in self.redactions]
        lines += [f"flagged model version {version}: trained on purged feedback "
                  f"{', '.join(map(str, ids))}" for version, ids in sorted(self.flagged.items())]
        if self.quarantine_rows or self.embeddings:
            lines.append(f"deleted {self.quarantine_rows} quarantined copies and {self.embeddings} "
                         "prompt embeddings of them")
        return lines


def redact(connection: sa.Connection, feedback_ids: list[int], *, actor: str, reason: str) -> Outcome:
    """Cut the examples of `feedback_ids` from every dataset and prompt-set version, delete their
    quarantined copies and embeddings, record each redaction and flag the model versions trained
    on them; all in `connection`'s transaction except the file rewrites, which are done first and
    are harmless to repeat (a purge that then fails and is retried finds nothing left to cut)."""
    ids = {int(i) for i in feedback_ids}
    outcome = Outcome()
    by_dataset: dict[str, set[int]] = {}
    for folder in _version_folders(dataset_store.version_paths(connection)):
        cut = dataset_store.redact_accepted(folder, ids)
        if len(cut):
            hit = sorted({int(i) for i in cut["feedback_id"]})
            by_dataset[folder.name] = set(hit)
            outcome.redactions.append(Redaction(DATASETS, folder.name,
                                                str(folder / dataset_store.ACCEPTED_FILE), hit, len(cut)))
            outcome.embeddings += embeddings.delete_rows(connection, folder.name,
                                                         [int(n) for n in cut["_row_number"]])
    by_prompt_set: dict[str, set[int]] = {}
    for folder in _version_folders(templates.version_paths(connection)):
        for file_name in SPLIT_FILES.values():
            hit, removed = _redact_records(folder / file_name, ids)
            if removed:
                by_prompt_set.setdefault(folder.name, set()).update(hit)
                outcome.redactions.append(Redaction(PROMPT_SETS, folder.name, str(folder / file_name),
                                                    sorted(hit), removed))
    outcome.quarantine_rows = dataset_store.delete_feedback_quarantine(connection, sorted(ids))
    _record(connection, outcome.redactions, actor, reason)
    outcome.flagged = _trained_on(connection, by_dataset, by_prompt_set)
    registry.flag_purged_feedback(connection, outcome.flagged)
    return outcome


def redact_purged(connection: sa.Connection, version: str, folder: Path) -> list[int]:
    """Cut from a dataset version being recorded the examples of feedback rows that no longer exist
    (purged after the run read them, before any purge could see the version's folder); returns
    their ids."""
    accepted = dataset_store.read_accepted(folder)
    if "feedback_id" not in accepted:
        return []
    ids = sorted({int(i) for i in accepted["feedback_id"].dropna()})
    gone = traffic_log.missing_feedback(connection, ids) if ids else []
    if gone:
        cut = dataset_store.redact_accepted(folder, set(gone))
        _record(connection, [Redaction(DATASETS, version, str(Path(folder) / dataset_store.ACCEPTED_FILE),
                                       list(gone), len(cut))],
                actor="purge", reason="purged while this version was being made")
    return list(gone)


def _version_folders(paths: list[str]) -> list[Path]:
    """Every version folder of a kind: those its version table records (`paths`), and their
    siblings (a version written but never recorded, e.g. by a run that failed after writing it)."""
    recorded = {Path(p) for p in paths}
    folders = set(recorded)
    for parent in {p.parent for p in recorded}:
        if parent.is_dir():
            folders.update(c for c in parent.iterdir() if c.is_dir() and not c.name.startswith("."))
    return sorted(f for f in folders if f.is_dir())


def _redact_records(path: Path, ids: set[int]) -> tuple[set[int], int]:
    """Rewrite a prompt-set file without the records of `ids`: (ids found, records removed)."""
    if not path.is_file():
        return set(), 0
    records = read_records(path)
    kept = [r for r in records if r.get("feedback_id") not in ids]
    if len(kept) == len(records):
        return set(), 0
    _write_private(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
    return {int(r["feedback_id"]) for r in records if r.get("feedback_id") in ids}, len(records) - len(kept)


def _write_private(path: Path, text: str) -> None:
    """Replace `path` atomically by `text` in a file only its owner reads (0600 from creation)."""
    staging = path.with_name(f".{path.name}.{os.getpid()}")
    descriptor = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(staging, path)


def _record(connection: sa.Connection, redactions: list[Redaction], actor: str, reason: str) -> None:
    """A row of artifact_redactions and an entry in the folder's redactions.json per file."""
    if not redactions:
        return
    connection.execute(
        sa.text("INSERT INTO artifact_redactions (kind, version, path, feedback_ids, rows_removed, actor, "
                "reason) VALUES (:kind, :version, :path, CAST(:feedback_ids AS bigint[]), :rows_removed, "
                ":actor, :reason)"),
        [{"kind": r.kind, "version": r.version, "path": r.path, "feedback_ids": r.feedback_ids,
          "rows_removed": r.rows_removed, "actor": actor, "reason": reason} for r in redactions])
    at = datetime.now(UTC).isoformat()
    for folder in {Path(r.path).parent for r in redactions}:
        log = folder / REDACTIONS_FILE
        entries = json.loads(log.read_text(encoding="utf-8")) if log.is_file() else []
        entries += [{"file": Path(r.path).name, "feedback_ids": r.feedback_ids,
                     "rows_removed": r.rows_removed, "actor": actor, "reason": reason, "at": at}
                    for r in redactions if Path(r.path).parent == folder]
        _write_private(log, json.dumps(entries, indent=2))


def _trained_on(connection: sa.Connection, by_dataset: dict[str, set[int]],
                by_prompt_set: dict[str, set[int]]) -> dict[str, list[int]]:
    """model version -> the purged ids it was trained on: from its dataset or prompt set, or from
    the adapter it was warm-started from (train_config.init_adapter), to any depth."""
    versions = registry.training_inputs(connection)
    hits = {v["version"]: by_dataset.get(v["dataset_version"], set())
            | by_prompt_set.get(v["prompt_set_version"], set()) for v in versions}
    changed = True
    while changed:  # each pass carries flags one warm start further
        changed = False
        by_adapter = {v["adapter_path"]: hits[v["version"]] for v in versions}
        for v in versions:
            inherited = by_adapter.get(v["init_adapter"], set()) - hits[v["version"]]
            if v["init_adapter"] and inherited:
                hits[v["version"]] = hits[v["version"]] | inherited
                changed = True
    return {version: sorted(ids) for version, ids in hits.items() if ids}

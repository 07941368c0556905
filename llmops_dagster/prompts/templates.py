"""Versioned prompt sets: a validated dataset rendered into train and eval records by the base
model's chat template or a Jinja file in `prompts/` (rendering.py).

A prompt set's version is the hash of the renderer (its kind and text) and the dataset version, so
changing either gives a new version and rendering the same pair again gives the same one.

Owns prompt_set_versions: every SQL statement on it is here.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import sqlalchemy as sa

from llmops_dagster.prompts.rendering import (
    TEMPLATE,
    PromptRenderer,
    RenderingError,
    choose_renderer,
    load_renderer,
    render_prompt,
)

TEMPLATE_SUFFIX = ".jinja"
SPLIT_FILES = {"train": "train.jsonl", "eval": "eval.jsonl"}


def record_features():
    """The schema of a prompt-set record, for `datasets.load_dataset("json", features=...)`."""
    from datasets import Features, Value

    return Features({"prompt": Value("string"), "completion": Value("string"),
                     "slice": Value("string"), "source_row": Value("int64"),
                     "feedback_id": Value("int64")})


PromptTemplateError = RenderingError  # a template file that is missing or does not render

TEMPLATE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def load_template(prompts_dir: Path, name: str) -> PromptRenderer:
    """The template `name` (a file prompts/<name>.jinja; no path, no '..')."""
    if not TEMPLATE_NAME.fullmatch(name) or ".." in name:
        raise PromptTemplateError(f"prompt template name {name!r} must be a file name in {prompts_dir} "
                                  "(letters, digits, '_', '-', '.'; no path)")
    path = prompts_dir / f"{name}{TEMPLATE_SUFFIX}"
    if not path.is_file():
        available = sorted(p.stem for p in prompts_dir.glob(f"*{TEMPLATE_SUFFIX}"))
        raise PromptTemplateError(
            f"prompt template {name!r} not found in {prompts_dir}; available: {available}"
        )
    return PromptRenderer(kind=TEMPLATE, name=name, text=path.read_text(encoding="utf-8"))


# Bumped when the record format changes, so that a prompt set written in an older format is never
# reused as the new one (2: records carry feedback_id; 3: slice, conversations, chat templates).
RECORD_FORMAT = 3


def prompt_set_version(renderer: PromptRenderer, dataset_version: str) -> str:
    return hashlib.sha256(f"{renderer.sha}:{dataset_version}:{RECORD_FORMAT}".encode()).hexdigest()[:16]


def feedback_ids(accepted: pd.DataFrame) -> pd.Series:
    """Each row's feedback id as an int, None for a trusted row (also when the column is missing).
    Object dtype: a float column would write NaN, and pandas NA does not serialize to JSON."""
    values = accepted["feedback_id"] if "feedback_id" in accepted else [None] * len(accepted)
    return pd.Series([None if pd.isna(v) else int(v) for v in values], index=accepted.index,
                     dtype=object)


def _column(accepted: pd.DataFrame, name: str, default=None) -> list:
    if name not in accepted:
        return [default] * len(accepted)
    return [default if v is None or (isinstance(v, float) and pd.isna(v)) else v for v in accepted[name]]


def render_records(renderer: PromptRenderer, accepted: pd.DataFrame, tokenizer=None) -> pd.DataFrame:
    """One record a row: the rendered prompt (the conversation so far), the completion, the slice
    ("all" when the source has none), the split, the source row and the feedback id (None for a
    trusted row, the id for one made from a person's correction)."""
    contexts = _column(accepted, "context")
    rendered = [render_prompt(renderer, p, c, tokenizer)
                for p, c in zip(accepted["prompt"], contexts, strict=True)]
    return pd.DataFrame(
        {
            "prompt": rendered,
            "completion": accepted["response"].map(renderer.completion),
            "slice": _column(accepted, "slice", "all"),
            "split": accepted["split"],
            "source_row": accepted["_row_number"].astype(int),
            "feedback_id": feedback_ids(accepted),
        }
    )


def render_prompt_set(mode: str, prompts_dir: Path, template_name: str, base_model_path: str,
                      accepted: pd.DataFrame) -> tuple[PromptRenderer, pd.DataFrame]:
    """The renderer `mode` chooses (rendering.choose_renderer) between the base model's chat
    template and template `template_name`, and the records of a dataset version's `accepted`
    rows rendered by it; RenderingError names what does not render."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model_path)
    template = load_template(prompts_dir, template_name)
    renderer = choose_renderer(mode, tokenizer, template)
    return renderer, render_records(renderer, accepted, tokenizer)


def learned_template_mismatch(learned: str, renderer: PromptRenderer) -> str | None:
    """The warning when a scratch base model's tokenizer learned another template than the one
    the prompts are rendered by (`learned` "-": not a scratch tokenizer), else None."""
    if learned in ("-", renderer.name):
        return None
    return (f"the scratch base model's tokenizer learned template {learned!r}, the "
            f"prompts are rendered by {renderer.name!r}: set "
            "base_model.tokenizer_template to it, or prompts may be cut at seq_len")


def split_rows(records: pd.DataFrame) -> tuple[int, int]:
    """(train records, eval records) of a prompt set."""
    counts = records["split"].value_counts()
    return int(counts.get("train", 0)), int(counts.get("eval", 0))


def write_prompt_set(folder: Path, records: pd.DataFrame, renderer: PromptRenderer) -> None:
    """train.jsonl and eval.jsonl (JSON lines, read with `read_records`), the renderer and its
    template text (<name>.jinja, for people to read)."""
    for split, file_name in SPLIT_FILES.items():
        part = records[records["split"] == split].drop(columns=["split"])
        with (folder / file_name).open("w", encoding="utf-8") as handle:
            for record in part.to_dict(orient="records"):
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    (folder / f"{renderer.name}{TEMPLATE_SUFFIX}").write_text(renderer.text, encoding="utf-8")
    renderer.save(folder)


def record_prompt_set_version(engine, version: str, dataset_version: str,
                              template: PromptRenderer, path: Path, train_rows: int,
                              eval_rows: int) -> None:
    """Register the prompt set in PostgreSQL (lineage: prompt set -> dataset version)."""
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "INSERT INTO prompt_set_versions (version, dataset_version, template_name, "
                "template_sha, path, train_rows, eval_rows) VALUES (:version, :dataset_version, "
                ":template_name, :template_sha, :path, :train_rows, :eval_rows) "
                "ON CONFLICT (version) DO NOTHING"
            ),
            {"version": version, "dataset_version": dataset_version,
             "template_name": template.name, "template_sha": template.sha, "path": str(path),
             "train_rows": train_rows, "eval_rows": eval_rows},
        )


def version_paths(connection: sa.Connection) -> list[str]:
    """The folder of every recorded prompt-set version."""
    return connection.execute(sa.text("SELECT path FROM prompt_set_versions")).scalars().all()


@dataclass(frozen=True)
class PromptSetVersion:
    """A prompt set as prompt_set_versions records it: the hand-off to the fine-tune."""

    version: str
    dataset_version: str
    template_name: str
    template_sha: str
    path: str  # the version's folder (SPLIT_FILES and the template inside)
    train_rows: int
    eval_rows: int


def recorded_prompt_set(connection: sa.Connection, version: str) -> PromptSetVersion | None:
    """What the table records of prompt set `version`, or None when it is not recorded."""
    row = connection.execute(
        sa.text("SELECT version, dataset_version, template_name, template_sha, path, train_rows, "
                "eval_rows FROM prompt_set_versions WHERE version = :v"), {"v": version}
    ).mappings().first()
    return PromptSetVersion(**row) if row is not None else None


def recorded_renderer(engine: sa.Engine, version: str) -> PromptRenderer:
    """How prompt set `version` was rendered (what the model it trained expects); NoResultFound
    when the version is not recorded."""
    with engine.connect() as connection:
        prompt_set = connection.execute(
            sa.text("SELECT path, template_name FROM prompt_set_versions WHERE version = :v"),
            {"v": version}).one()
    return load_renderer(Path(prompt_set.path), prompt_set.template_name)


def read_records(path: Path) -> list[dict]:
    """The records of a prompt-set file. Split on newlines only: a record's text may hold other
    Unicode line breaks (U+2028, U+0085, ...) that str.splitlines would cut it at."""
    text = Path(path).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.split("\n") if line.strip()]

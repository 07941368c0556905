"""Evaluating models on the held-out eval split: loss and perplexity, exact match, token F1, the
same per slice, generation latency, and a paired bootstrap of candidate minus champion.
Owns the table eval_reports: every statement on it is here.

The eval split has two parts. The trusted split (records without a feedback_id) gives the main
metrics, the per-slice metrics and the comparison the policy gates on. The feedback slice (records
made from people's corrections of served answers) is scored on its own, with its own comparison,
so corrections cannot hide a regression on the trusted examples, nor be hidden by them. The
complaint slice (complaints.py: down-voted answers of the production model) is scored beside them.

Every model is loaded through `from_pretrained` from a local folder and answers each eval prompt
with greedy decoding, one request at a time, as a served model would.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

MAIN_METRIC = "token_f1"
FEEDBACK_SLICE = "feedback_slice"  # key of the feedback slice inside the stored comparison
COMPLAINT_SLICE = "complaint_slice"  # key of the complaint slice (complaints.py) inside it
_WORD = re.compile(r"\w+|[^\w\s]")


@dataclass(frozen=True)
class EvalSettings:
    """How much of the eval split is scored and how, declared once: eval_report's config and
    `evaluate` take their defaults and descriptions from here."""

    max_examples: int = field(default=120, metadata={
        "help": "Trusted eval records scored (the first N without a feedback_id): the split the "
        "policy gates on."})
    max_feedback_examples: int = field(default=200, metadata={
        "help": "Feedback-derived eval records scored as their own slice (the first N with a "
        "feedback_id)."})
    max_complaint_examples: int = field(default=200, metadata={
        "help": "Complaint examples scored (complaints.py): the newest distinct prompts behind "
        "counted down-votes of the production model's answers, before those in the candidate's "
        "train split are left out."})
    max_new_tokens: int = field(default=48, metadata={"help": "Longest generated answer (tokens)."})
    batch_size: int = field(default=16, metadata={
        "ge": 1, "help": "Records answered together (greedy, left-padded: the same answers as one "
        "at a time, in a fraction of the time)."})
    bootstrap_samples: int = field(default=1000, metadata={"help": "Resamples of the paired bootstrap."})
    seed: int = field(default=0, metadata={"help": "Seed of the bootstrap."})


def normalize_answer(text: str) -> str:
    return " ".join(text.lower().split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style F1 over lower-cased word and punctuation tokens."""
    predicted = _WORD.findall(prediction.lower())
    expected = _WORD.findall(reference.lower())
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def paired_bootstrap(candidate: np.ndarray, champion: np.ndarray, samples: int = 1000,
                     seed: int = 0) -> dict:
    """95% CI of mean(candidate - champion) by resampling examples with replacement (paired)."""
    differences = np.asarray(candidate, dtype=float) - np.asarray(champion, dtype=float)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(differences), size=(samples, len(differences)))
    means = differences[draws].mean(axis=1)
    return {
        "mean_difference": float(differences.mean()),
        "ci_low": float(np.percentile(means, 2.5)),
        "ci_high": float(np.percentile(means, 97.5)),
        "samples": samples,
        "examples": len(differences),
    }


def split_eval_records(records: list[dict], max_examples: int,
                       max_feedback_examples: int) -> tuple[list[dict], list[dict]]:
    """The first `max_examples` trusted records (feedback_id None or absent, as in prompt sets
    written before it) and the first `max_feedback_examples` feedback-derived ones."""
    trusted = [r for r in records if r.get("feedback_id") is None]
    feedback = [r for r in records if r.get("feedback_id") is not None]
    return trusted[:max_examples], feedback[:max_feedback_examples]


def load_eval_records(eval_file: str | Path, max_examples: int,
                      max_feedback_examples: int) -> tuple[list[dict], list[dict]]:
    """`split_eval_records` of a prompt set's eval.jsonl (its order is fixed)."""
    from llmops_dagster.prompts.templates import read_records

    return split_eval_records(read_records(Path(eval_file)), max_examples, max_feedback_examples)


@dataclass
class ModelScores:
    """Per-example scores of one model, and its teacher-forced loss on the eval split."""

    name: str
    path: str
    per_example: pd.DataFrame  # slice, exact_match, token_f1, latency_ms (its batch's), prediction
    loss: float  # nats per answer token
    generation_s: float = 0.0  # wall time to answer every record (s)
    extra: dict = field(default_factory=dict)

    def summary(self) -> dict:
        frame = self.per_example
        return {
            "loss": round(self.loss, 4),
            "perplexity": round(math.exp(min(self.loss, 50.0)), 3),
            "exact_match": round(float(frame["exact_match"].mean()), 4),
            "token_f1": round(float(frame["token_f1"].mean()), 4),
            "batch_latency_p50_ms": round(float(frame["latency_ms"].quantile(0.5)), 2),
            "generation_s": round(self.generation_s, 2),
            "examples": len(frame),
        }

    def slices(self) -> dict:
        grouped = self.per_example.groupby("slice")[["exact_match", "token_f1"]].mean().round(4)
        return {name: row.to_dict() for name, row in grouped.iterrows()}


def load_model(path: str) -> tuple:
    """The model and its tokenizer, from a local folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def score_model(name: str, path: str, records: list[dict], max_new_tokens: int, seq_len: int,
                loaded: tuple | None = None, batch_size: int = 16) -> ModelScores:
    """Greedy answers to every record, `batch_size` at a time (the same answers as one at a time:
    generation.py), and the teacher-forced loss on exactly those records. `loaded`:
    `load_model(path)` already done, to score several sets."""
    from llmops_dagster import generation
    from llmops_dagster.training.examples import encode_records, evaluate_loss

    model, tokenizer = loaded or load_model(path)
    model.eval()  # no dropout while answering; evaluate_loss leaves a model in train mode
    ids = [generation.prompt_ids(tokenizer, record["prompt"], seq_len) for record in records]
    # Similar lengths share a batch (less padding to compute); answers go back to record order.
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    predictions, batch_ms = [""] * len(ids), [0.0] * len(ids)
    started = time.perf_counter()
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        began = time.perf_counter()
        answers = generation.greedy_batch(model, tokenizer, [ids[i] for i in batch],
                                          [max_new_tokens] * len(batch))
        took_ms = (time.perf_counter() - began) * 1000
        for i, answer in zip(batch, answers, strict=True):
            predictions[i], batch_ms[i] = answer, took_ms
    generation_s = time.perf_counter() - started
    rows = [{
        "slice": record.get("slice") or record.get("intent") or "all",  # intent: format 2
        "source_row": record.get("source_row"),
        "exact_match": exact_match(prediction, record["completion"]),
        "token_f1": token_f1(prediction, record["completion"]),
        "latency_ms": took_ms,  # the batch's time: what this answer waited for
        "prediction": prediction,
    } for record, prediction, took_ms in zip(records, predictions, batch_ms, strict=True)]
    return ModelScores(name=name, path=path, per_example=pd.DataFrame(rows),
                       loss=evaluate_loss(model, encode_records(records, tokenizer, seq_len)),
                       generation_s=generation_s)


def compare(scores: dict[str, ModelScores], samples: int, seed: int) -> dict | None:
    """Paired bootstrap of candidate minus champion on MAIN_METRIC; None without a champion."""
    if "champion" not in scores:
        return None
    comparison = paired_bootstrap(
        scores["candidate"].per_example[MAIN_METRIC].to_numpy(),
        scores["champion"].per_example[MAIN_METRIC].to_numpy(),
        samples=samples, seed=seed,
    )
    return {**comparison, "metric": MAIN_METRIC}


@dataclass
class EvalReport:
    scores: dict[str, ModelScores]  # trusted split, by role: candidate, champion (if any), base
    comparison: dict | None  # trusted split: paired bootstrap on MAIN_METRIC, candidate - champion
    feedback_scores: dict[str, ModelScores] = field(default_factory=dict)  # {} without examples
    feedback_comparison: dict | None = None  # the same bootstrap on the feedback slice
    complaint_slice: dict | None = None  # complaints.summarize; None: not scored
    complaint_generation_s: float = 0.0  # seconds the models spent answering the complaint slice

    def metrics(self) -> dict:
        return {role: s.summary() for role, s in self.scores.items()}

    def slices(self) -> dict:
        return {role: s.slices() for role, s in self.scores.items()}

    def feedback_metrics(self) -> dict:
        return {role: s.summary() for role, s in self.feedback_scores.items()}

    def feedback_examples(self) -> int:
        return len(self.feedback_scores["candidate"].per_example) if self.feedback_scores else 0

    def generation_s(self) -> float:
        """Seconds every model spent generating, on both parts of the split and the complaint slice."""
        return self.complaint_generation_s + sum(
            s.generation_s for s in [*self.scores.values(), *self.feedback_scores.values()])

    def progress_lines(self) -> list[str]:
        """One line a model: examples scored, token F1 on the trusted split, generation time."""
        lines = []
        for role, scores in self.scores.items():
            feedback = self.feedback_scores.get(role)
            lines.append(
                f"progress: {role}: {len(scores.per_example)} examples scored"
                + (f" + {len(feedback.per_example)} feedback" if feedback else "")
                + f", token F1 {scores.per_example['token_f1'].mean():.4f}, generation "
                f"{scores.generation_s + (feedback.generation_s if feedback else 0.0):.1f} s")
        return lines

    def stored_comparison(self) -> dict:
        """The comparison column: the trusted bootstrap's keys ({} without a champion), under
        FEEDBACK_SLICE the slice's examples, metrics by role and bootstrap (None without a champion
        or examples), and under COMPLAINT_SLICE the complaint slice when it was scored. Read it
        back with `read_comparison` and complaints.read_slice."""
        stored = {**(self.comparison or {}),
                  FEEDBACK_SLICE: {"examples": self.feedback_examples(),
                                   "metrics": self.feedback_metrics(),
                                   "comparison": self.feedback_comparison}}
        if self.complaint_slice is not None:
            stored[COMPLAINT_SLICE] = self.complaint_slice
        return stored


def read_comparison(stored: dict) -> tuple[dict | None, dict]:
    """(trusted bootstrap or None, feedback slice) from a stored report's comparison column; a
    report stored before the feedback slice existed reads as one with no feedback examples."""
    trusted = {k: v for k, v in stored.items() if k not in (FEEDBACK_SLICE, COMPLAINT_SLICE)}
    feedback = stored.get(FEEDBACK_SLICE) or {"examples": 0, "metrics": {}, "comparison": None}
    return trusted or None, feedback


def evaluate(models: dict[str, str], eval_file: str | Path, max_examples: int, max_new_tokens: int,
             seq_len: int, bootstrap_samples: int, seed: int,
             max_feedback_examples: int = EvalSettings.max_feedback_examples,
             batch_size: int = EvalSettings.batch_size, *, complaints=None) -> EvalReport:
    """Score every model (role -> folder) on the same trusted records and, when the eval split has
    any, the same feedback-derived records; compare candidate to champion on each. `complaints`
    (complaints.Complaints, or None: not scored): the candidate and champion answer its examples
    too, summarized as the report's complaint slice."""
    from llmops_dagster.evaluation import complaints as complaint_module

    records, feedback = load_eval_records(eval_file, max_examples, max_feedback_examples)
    if not records:
        raise ValueError(f"the eval split {eval_file} has no trusted records: nothing to evaluate on")
    complaint_records = complaints.records() if complaints is not None else []
    scores, feedback_scores, complaint_answers, complaint_s = {}, {}, {}, 0.0
    for role, path in models.items():
        loaded = load_model(path)
        scores[role] = score_model(role, path, records, max_new_tokens, seq_len, loaded, batch_size)
        if feedback:
            feedback_scores[role] = score_model(role, path, feedback, max_new_tokens, seq_len, loaded,
                                                batch_size)
        if complaint_records and role in complaint_module.ROLES:
            scored = score_model(role, path, complaint_records, max_new_tokens, seq_len, loaded, batch_size)
            complaint_s += scored.generation_s
            complaint_answers[role] = scored.per_example["prediction"].tolist()
    return EvalReport(scores=scores, comparison=compare(scores, bootstrap_samples, seed),
                      feedback_scores=feedback_scores,
                      feedback_comparison=compare(feedback_scores, bootstrap_samples, seed),
                      complaint_slice=(None if complaints is None
                                       else complaint_module.summarize(complaints, complaint_answers)),
                      complaint_generation_s=complaint_s)


def store_report(engine, report: EvalReport, candidate_version: str, champion_version: str | None,
                 dataset_version: str, prompt_set_version: str) -> int:
    """Insert the report into eval_reports; return its id. metrics and slices are the trusted
    split's; comparison is `report.stored_comparison()` (the feedback slice inside it)."""
    import sqlalchemy as sa

    with engine.begin() as connection:
        return connection.execute(
            sa.text(
                "INSERT INTO eval_reports (candidate_version, champion_version, dataset_version, "
                "prompt_set_version, metrics, slices, comparison) VALUES (:candidate, :champion, "
                ":dataset, :prompts, CAST(:metrics AS jsonb), CAST(:slices AS jsonb), "
                "CAST(:comparison AS jsonb)) RETURNING id"
            ),
            {"candidate": candidate_version, "champion": champion_version, "dataset": dataset_version,
             "prompts": prompt_set_version, "metrics": json.dumps(report.metrics()),
             "slices": json.dumps(report.slices()),
             "comparison": json.dumps(report.stored_comparison())},
        ).scalar_one()


def load_report(engine, report_id: int) -> dict:
    import sqlalchemy as sa

    with engine.connect() as connection:
        row = connection.execute(
            sa.text("SELECT * FROM eval_reports WHERE id = :id"), {"id": report_id}
        ).mappings().one_or_none()
    if row is None:
        raise ValueError(f"eval report {report_id} is not in the eval_reports table")
    return dict(row)


def metrics_markdown(metrics: dict) -> str:
    """Models as rows, metrics as columns."""
    frame = pd.DataFrame(metrics).T
    return frame.to_markdown()


def lowest_slice(slices: dict, metric: str = "exact_match") -> tuple[str, float] | None:
    """(name, value) of the slice with the lowest `metric`; None without slices. `slices`: one
    model's {slice: {metric: value}}, as an eval report stores it."""
    scored = [(values[metric], name) for name, values in (slices or {}).items() if metric in values]
    if not scored:
        return None
    value, name = min(scored)
    return name, value


def lowest_slice_text(slices: dict | None) -> str:
    """'name: exact match' of the weakest slice, for an eval report's metadata."""
    weakest = lowest_slice(slices or {})
    return "no slices" if weakest is None else f"{weakest[0]}: exact match {weakest[1]:.4f}"


def slices_markdown(slices: dict, metric: str = MAIN_METRIC) -> str:
    """`metric` per slice (rows) and model (columns)."""
    frame = pd.DataFrame({role: {name: v[metric] for name, v in by_slice.items()}
                          for role, by_slice in slices.items()})
    return frame.to_markdown()


def slices_plot_markdown(slices: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")

    from llmops_dagster.infra.plots import figure_markdown

    frame = pd.DataFrame({role: {name: v[MAIN_METRIC] for name, v in by_slice.items()}
                          for role, by_slice in slices.items()})
    axis = frame.plot.barh(figsize=(7, 0.35 * len(frame) + 1.5))
    axis.set_xlabel("token F1")
    axis.set_xlim(0, 1)
    axis.set_title("Token F1 per slice")
    return figure_markdown(axis.figure, "token F1 per slice")


def difference_text(comparison: dict | None, missing: str) -> str:
    """Candidate minus champion token F1 with its bootstrap 95% CI, or why there is none."""
    if comparison is None:
        return missing
    return (f"{comparison['mean_difference']:+.4f} "
            f"(95% CI {comparison['ci_low']:+.4f} .. {comparison['ci_high']:+.4f})")


# Entries of `report_summary` that are markdown (tables, a plot).
MARKDOWN_ENTRIES = ("metrics", "feedback_slice_metrics", "complaint_slice_metrics", "token_f1_per_slice",
                    "exact_match_per_slice", "plot")


def report_summary(report: EvalReport, batch_size: int) -> dict:
    """The report's headline numbers, texts and markdown (MARKDOWN_ENTRIES), in the order a reader
    takes them in: the candidate on the trusted split, against the champion, then the feedback
    slice, the complaint slice, then per slice."""
    from llmops_dagster.evaluation import complaints

    metrics, slices = report.metrics(), report.slices()
    complaint_slice = complaints.read_slice({COMPLAINT_SLICE: report.complaint_slice})
    feedback_metrics = report.feedback_metrics()
    return {
        "examples": metrics["candidate"]["examples"],
        "generation_s": round(report.generation_s(), 2),
        "generation_batch_size": batch_size,
        "candidate_token_f1": metrics["candidate"]["token_f1"],
        "candidate_exact_match": metrics["candidate"]["exact_match"],
        # The average can hide a slice the model gets wrong: its weakest slice beside it.
        "candidate_lowest_slice": lowest_slice_text(slices.get("candidate")),
        "candidate_loss": metrics["candidate"]["loss"],
        "token_f1_vs_champion": difference_text(report.comparison, "no champion"),
        "metrics": metrics_markdown(metrics),
        "feedback_slice_examples": report.feedback_examples(),
        "feedback_slice_token_f1": (feedback_metrics["candidate"]["token_f1"]
                                    if feedback_metrics else "no feedback examples"),
        "feedback_token_f1_vs_champion": difference_text(
            report.feedback_comparison,
            "no champion" if feedback_metrics else "no feedback examples"),
        "feedback_slice_metrics": (metrics_markdown(feedback_metrics) if feedback_metrics
                                   else "No feedback-derived examples in the eval split."),
        "complaint_slice_examples": complaint_slice["examples"],
        "complaint_slice": complaints.figures_text(complaint_slice),
        "complaint_slice_metrics": complaints.metrics_markdown(complaint_slice),
        "token_f1_per_slice": slices_markdown(slices),
        "exact_match_per_slice": slices_markdown(slices, "exact_match"),
        "plot": slices_plot_markdown(slices),
    }

"""Evaluating models on the held-out eval split: loss and perplexity, exact match, token F1, the
same per intent, generation latency, and a paired bootstrap of candidate minus champion.

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
_WORD = re.compile(r"\w+|[^\w\s]")


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


def load_eval_records(eval_file: str | Path, max_examples: int) -> list[dict]:
    """The first `max_examples` records of a prompt set's eval.jsonl (its order is fixed)."""
    from llmops_dagster.prompts.templates import read_records

    return read_records(Path(eval_file))[:max_examples]


@dataclass
class ModelScores:
    """Per-example scores of one model, and its teacher-forced loss on the eval split."""

    name: str
    path: str
    per_example: pd.DataFrame  # intent, exact_match, token_f1, latency_ms, prediction
    loss: float  # nats per answer token
    extra: dict = field(default_factory=dict)

    def summary(self) -> dict:
        frame = self.per_example
        return {
            "loss": round(self.loss, 4),
            "perplexity": round(math.exp(min(self.loss, 50.0)), 3),
            "exact_match": round(float(frame["exact_match"].mean()), 4),
            "token_f1": round(float(frame["token_f1"].mean()), 4),
            "latency_p50_ms": round(float(frame["latency_ms"].quantile(0.5)), 2),
            "latency_p95_ms": round(float(frame["latency_ms"].quantile(0.95)), 2),
            "examples": len(frame),
        }

    def slices(self) -> dict:
        grouped = self.per_example.groupby("intent")[["exact_match", "token_f1"]].mean().round(4)
        return {intent: row.to_dict() for intent, row in grouped.iterrows()}


def score_model(name: str, path: str, records: list[dict], max_new_tokens: int, seq_len: int,
                eval_file: str | Path) -> ModelScores:
    """Greedy answers to every record (one request at a time, timed) and the eval loss."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmops_dagster.training.examples import encode_examples, evaluate_loss

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    model.eval()
    rows = []
    with torch.inference_mode():
        for record in records:
            ids = tokenizer(record["prompt"], add_special_tokens=False)["input_ids"]
            if tokenizer.bos_token_id is not None:
                ids = [tokenizer.bos_token_id] + ids
            input_ids = torch.tensor([ids[-(seq_len - 1):]])
            started = time.perf_counter()
            output = model.generate(
                input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            )
            latency_ms = (time.perf_counter() - started) * 1000
            prediction = tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True)
            rows.append({
                "intent": record["intent"],
                "source_row": record.get("source_row"),
                "exact_match": exact_match(prediction, record["completion"]),
                "token_f1": token_f1(prediction, record["completion"]),
                "latency_ms": latency_ms,
                "prediction": prediction,
            })
    encoded = encode_examples(str(eval_file), tokenizer, seq_len)
    encoded = {k: v[: len(records)] for k, v in encoded.items()}
    return ModelScores(name=name, path=path, per_example=pd.DataFrame(rows),
                       loss=evaluate_loss(model, encoded))


@dataclass
class EvalReport:
    scores: dict[str, ModelScores]  # by role: candidate, champion (when there is one), base
    comparison: dict | None  # paired bootstrap on MAIN_METRIC, candidate - champion

    def metrics(self) -> dict:
        return {role: s.summary() for role, s in self.scores.items()}

    def slices(self) -> dict:
        return {role: s.slices() for role, s in self.scores.items()}


def evaluate(models: dict[str, str], eval_file: str | Path, max_examples: int, max_new_tokens: int,
             seq_len: int, bootstrap_samples: int, seed: int) -> EvalReport:
    """Score every model (role -> folder) on the same eval records; compare candidate to champion."""
    records = load_eval_records(eval_file, max_examples)
    if not records:
        raise ValueError(f"the eval split {eval_file} is empty: nothing to evaluate on")
    scores = {role: score_model(role, path, records, max_new_tokens, seq_len, eval_file)
              for role, path in models.items()}
    comparison = None
    if "champion" in scores:
        comparison = paired_bootstrap(
            scores["candidate"].per_example[MAIN_METRIC].to_numpy(),
            scores["champion"].per_example[MAIN_METRIC].to_numpy(),
            samples=bootstrap_samples, seed=seed,
        )
        comparison["metric"] = MAIN_METRIC
    return EvalReport(scores=scores, comparison=comparison)


def store_report(engine, report: EvalReport, candidate_version: str, champion_version: str | None,
                 dataset_version: str, prompt_set_version: str) -> int:
    """Insert the report into eval_reports; return its id."""
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
             "slices": json.dumps(report.slices()), "comparison": json.dumps(report.comparison or {})},
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


def slices_markdown(slices: dict) -> str:
    """Token F1 per intent (rows) and model (columns)."""
    frame = pd.DataFrame({role: {intent: v[MAIN_METRIC] for intent, v in by_intent.items()}
                          for role, by_intent in slices.items()})
    return frame.to_markdown()


def slices_plot_markdown(slices: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")

    from llmops_dagster.plots import figure_markdown

    frame = pd.DataFrame({role: {intent: v[MAIN_METRIC] for intent, v in by_intent.items()}
                          for role, by_intent in slices.items()})
    axis = frame.plot.barh(figsize=(7, 0.35 * len(frame) + 1.5))
    axis.set_xlabel("token F1")
    axis.set_xlim(0, 1)
    axis.set_title("Token F1 per intent")
    return figure_markdown(axis.figure, "token F1 per intent")

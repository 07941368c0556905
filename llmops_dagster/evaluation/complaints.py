"""The complaint slice: what users flagged, measured. Its examples are the prompts behind counted
down-votes of answers the champion (the production version) served, each with the down-voted
answer and the accepted correction when there is one; a prompt the candidate was trained on (its
prompt set's train split) is left out, so the held-out corrections and the un-corrected down-votes
remain and nothing is scored on what it was trained on.

Per model: `repeats_downvoted` (share of examples answered with the down-voted answer again),
`gives_correction` (share of corrected examples answered with the correction; None without one)
and `fixed` (share answered with neither the down-voted answer nor, when a correction is known,
anything but it). The approval policy gates a loop retrain on candidate `fixed` minus champion
`fixed` (policy.improvement). The slice is stored inside the eval report's comparison column,
under COMPLAINT_SLICE (scoring.EvalReport.stored_comparison).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from llmops_dagster.evaluation.scoring import COMPLAINT_SLICE, exact_match, normalize_answer

ROLES = ("candidate", "champion")  # the models scored on it


@dataclass(frozen=True)
class ComplaintExample:
    feedback_id: int  # the down-vote the example comes from
    prompt: str  # rendered as the candidate's prompt set renders (what the model answers from)
    downvoted: str  # the answer people voted down
    correction: str | None  # the accepted correction, None without one


@dataclass(frozen=True)
class Complaints:
    """The complaint examples of one eval report, and where they come from."""

    champion_version: str | None  # whose served answers were down-voted (None: no production yet)
    examples: list[ComplaintExample]
    trained_on: int = 0  # down-voted prompts left out: in the candidate's train split

    def records(self) -> list[dict]:
        """The examples as eval records (scoring.score_model): the completion is the correction
        when known, else the down-voted answer (only the loss reads it)."""
        return [{"prompt": e.prompt, "completion": e.correction or e.downvoted, "slice": COMPLAINT_SLICE,
                 "feedback_id": e.feedback_id} for e in self.examples]


def _correction(value) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


def select_examples(rows: pd.DataFrame, render,
                    train_prompts: set[str]) -> tuple[list[ComplaintExample], int]:
    """Examples of `rows` (traffic_log.complaints' columns, newest first) whose rendered prompt
    (`render(prompt, context)`), normalized, is not in `train_prompts` (normalized); one per
    rendered prompt; and how many were left out as trained on."""
    examples, seen, trained_on = [], set(), 0
    for row in rows.itertuples(index=False):
        prompt = render(row.prompt, row.context if isinstance(row.context, str) else None)
        key = normalize_answer(prompt)
        if key in train_prompts:
            trained_on += 1
        elif key not in seen:
            seen.add(key)
            examples.append(ComplaintExample(feedback_id=int(row.feedback_id), prompt=prompt,
                                             downvoted=row.answer, correction=_correction(row.correction)))
    return examples, trained_on


def read_examples(engine, production, candidate, max_examples: int) -> Complaints:
    """The complaint examples of `candidate` (a training.plan.FinetuneRecord: its prompt set's
    train split and renderer; its merged model's tokenizer for a chat template) against
    `production` (a registry.ModelVersion, or None: no examples)."""
    if production is None:
        return Complaints(champion_version=None, examples=[])
    from llmops_dagster.prompts.rendering import CHAT_TEMPLATE, render_prompt
    from llmops_dagster.prompts.templates import read_records, recorded_renderer
    from llmops_dagster.serving import traffic_log

    rows = traffic_log.complaints(engine, production.version, max_examples)
    renderer = recorded_renderer(engine, candidate.prompt_set_version)
    tokenizer = None
    if renderer.kind == CHAT_TEMPLATE and len(rows):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(candidate.merged_model_path)
    train = {normalize_answer(r["prompt"]) for r in read_records(Path(candidate.run.train_file))}
    examples, trained_on = select_examples(
        rows, lambda prompt, context: render_prompt(renderer, prompt, context, tokenizer), train)
    return Complaints(champion_version=production.version, examples=examples, trained_on=trained_on)


def slice_metrics(examples: list[ComplaintExample], answers: list[str]) -> dict:
    """One model's answers to the examples (in order): repeats_downvoted, gives_correction (None
    without a corrected example), fixed; as shares of the examples (None without examples)."""
    if len(answers) != len(examples):
        raise ValueError(f"{len(answers)} answers for {len(examples)} complaint examples")
    pairs = list(zip(examples, answers, strict=True))
    repeats = [normalize_answer(a) == normalize_answer(e.downvoted) for e, a in pairs]
    corrected = [exact_match(a, e.correction) for e, a in pairs if e.correction]
    fixed = [not repeated and (e.correction is None or bool(exact_match(a, e.correction)))
             for (e, a), repeated in zip(pairs, repeats, strict=True)]

    def share(values: list) -> float | None:
        return round(sum(values) / len(values), 4) if values else None

    return {"repeats_downvoted": share(repeats), "gives_correction": share(corrected),
            "fixed": share(fixed)}


def summarize(complaints: Complaints, answers: dict[str, list[str]]) -> dict:
    """The slice as an eval report stores it: examples, corrected examples, prompts left out as
    trained on, the champion's version, and each scored role's metrics (`answers`: role -> its
    answers; a role not scored is None: the champion when the candidate is production itself)."""
    examples = complaints.examples
    return {"examples": len(examples), "corrected": sum(e.correction is not None for e in examples),
            "trained_on": complaints.trained_on, "champion_version": complaints.champion_version,
            "metrics": {role: slice_metrics(examples, answers[role]) if role in answers else None
                        for role in ROLES}}


EMPTY = {"examples": 0, "corrected": 0, "trained_on": 0, "champion_version": None,
         "metrics": {role: None for role in ROLES}}


def read_slice(stored: dict | None) -> dict:
    """The complaint slice of a stored comparison column; a report stored before the slice existed
    reads as one without examples."""
    return {**EMPTY, **((stored or {}).get(COMPLAINT_SLICE) or {})}


def fixed_difference(complaint_slice: dict) -> float | None:
    """Candidate `fixed` minus champion `fixed`; None when either is missing."""
    metrics = complaint_slice.get("metrics") or {}
    candidate, champion = metrics.get("candidate") or {}, metrics.get("champion") or {}
    if candidate.get("fixed") is None or champion.get("fixed") is None:
        return None
    return round(candidate["fixed"] - champion["fixed"], 4)


def figures_text(complaint_slice: dict) -> str:
    """The slice's headline figures in one line (eval_report's and approved_model's metadata)."""
    if not complaint_slice["examples"]:
        return (f"no complaint examples ({complaint_slice['trained_on']} down-voted prompts were "
                "in the candidate's train split)")
    metrics = complaint_slice["metrics"]
    fixed = {role: ("-" if (metrics.get(role) or {}).get("fixed") is None
                    else f"{metrics[role]['fixed']:.4f}") for role in ROLES}
    difference = fixed_difference(complaint_slice)
    return (f"{complaint_slice['examples']} complaint examples ({complaint_slice['corrected']} "
            f"with a correction): fixed {fixed['candidate']} (candidate) vs {fixed['champion']} "
            f"(champion {complaint_slice['champion_version']})"
            + ("" if difference is None else f", difference {difference:+.4f}"))


def metrics_markdown(complaint_slice: dict) -> str:
    """Metrics as rows, candidate and champion as columns."""
    if not complaint_slice["examples"]:
        return "No complaint examples: " + figures_text(complaint_slice) + "."
    frame = pd.DataFrame({role: metrics for role, metrics in complaint_slice["metrics"].items()
                          if metrics is not None}).astype(object)
    return frame.where(frame.notna(), "-").to_markdown()

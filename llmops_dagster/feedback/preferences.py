"""Preference data from people's ratings: pairs of a preferred and a dispreferred answer to one
prompt, and single rated answers, validated like the SFT data and capped per actor.

Pairs (what the preference step trains on):
- a counted down-vote whose correction a reviewer accepted: the correction is preferred to the
  down-voted answer ("correction");
- an answer up-voted and another down-voted for the same prompt (normalized): the up-voted one is
  preferred ("ratings"), one pair per distinct down-voted answer, against the answer up-voted by
  the most actors.
Singles: every counted rated answer with its label (desirable or not), kept for a KTO-style step.

Validation: a pair is rejected, with its reason, when a text holds personal data (the dataset's
PII patterns), a text is empty or longer than `max_chars`, the two answers are the same, it
repeats an earlier pair, or its actor (the down-voter's) already has `max_actor_share` of the
pairs: one actor cannot steer the preference step, however many answers they rate. Rejected rows
are kept (rejected.jsonl in the version's folder) with their reasons, never silently dropped.
Every pair carries its feedback ids and actors: lineage from a preference step to the ratings.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from llmops_dagster.dataset.validation import PII_PATTERNS

PAIRS_FILE, SINGLES_FILE, REJECTED_FILE = "pairs.jsonl", "singles.jsonl", "rejected.jsonl"


@dataclass(frozen=True)
class PreferenceRules:
    """How pairs are checked."""

    max_chars: int = field(default=2000, metadata={
        "ge": 1, "le": 100_000, "help": "Longest prompt or answer of a pair, in characters."})
    max_actor_share: float = field(default=0.2, metadata={
        "gt": 0.0, "le": 1.0, "help": "Most of the pairs one actor (the down-voter) may give; "
        "beyond it their pairs are rejected, so one actor cannot steer the preference step."})
    max_rows: int = field(default=20_000, metadata={
        "ge": 1, "help": "Newest counted ratings read to build pairs from."})


@dataclass(frozen=True)
class PreferenceSet:
    """What was built: accepted pairs, singles and rejected pairs (each with `reason`)."""

    pairs: pd.DataFrame
    singles: pd.DataFrame
    rejected: pd.DataFrame

    def counts(self) -> dict:
        actors = set() if self.pairs.empty else {a for row in self.pairs["actors"] for a in row}
        by_source = (self.pairs["source"].value_counts().to_dict() if not self.pairs.empty else {})
        return {"pairs": len(self.pairs), "pairs_from_corrections": int(by_source.get("correction", 0)),
                "pairs_from_ratings": int(by_source.get("ratings", 0)), "singles": len(self.singles),
                "rejected": len(self.rejected), "actors": len(actors)}


@dataclass(frozen=True)
class PreferenceSetProduct:
    """A preference set as a fine-tune takes it: its version, folder and number of pairs. Its folder
    is content-addressed (preferences/<version>), so the materialization that carries the version
    is its record."""

    version: str
    path: str
    pairs: int

    @classmethod
    def from_materialization(cls, version: str, metadata: dict) -> PreferenceSetProduct:
        return cls(version=version, path=metadata["path"], pairs=int(metadata["pairs"]))


def _normalized(text) -> str:
    return re.sub(r"\s+", " ", str(text or "")).strip().lower()


def build_pairs(rated: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(pairs, singles) from counted ratings (traffic_log.rated_answers: feedback_id, prompt,
    context, answer, rating, correction, review_state, actor), before validation."""
    columns = ["prompt", "context", "chosen", "rejected", "source", "feedback_ids", "actors"]
    if rated.empty:
        return pd.DataFrame(columns=columns), pd.DataFrame(columns=["prompt", "context", "answer",
                                                                     "label", "feedback_id", "actor"])
    rated = rated.assign(_key=rated["prompt"].map(_normalized))
    pairs = []
    down = rated[rated["rating"] < 0]
    for row in down[(down["review_state"] == "accepted") & down["correction"].notna()].itertuples():
        pairs.append((row.prompt, row.context, row.correction, row.answer, "correction",
                      [int(row.feedback_id)], [row.actor]))
    up = rated[rated["rating"] > 0]
    for key, ups in up.groupby("_key"):
        downs = down[down["_key"] == key]
        if downs.empty:
            continue
        # The answer up-voted by the most actors is the preferred one (ties: the newest rating).
        best = ups.groupby("answer").agg(actors=("actor", "nunique"), newest=("feedback_id", "max"))
        chosen = best.sort_values(["actors", "newest"], ascending=False).index[0]
        chosen_rows = ups[ups["answer"] == chosen]
        for answer, group in downs.groupby("answer"):
            first = group.iloc[0]
            pairs.append((first.prompt, first.context, chosen, answer, "ratings",
                          [int(chosen_rows["feedback_id"].max()), *map(int, group["feedback_id"])],
                          sorted({*group["actor"], *chosen_rows["actor"]})))
    singles = pd.DataFrame({"prompt": rated["prompt"], "context": rated["context"],
                            "answer": rated["answer"],
                            "label": rated["rating"].map(lambda r: "desirable" if r > 0 else "undesirable"),
                            "feedback_id": rated["feedback_id"].astype(int), "actor": rated["actor"]})
    return pd.DataFrame(pairs, columns=columns), singles.reset_index(drop=True)


def _pii(text: str) -> str | None:
    for label, pattern in PII_PATTERNS.items():
        if re.search(pattern, str(text or "")):
            return label
    return None


def validate_pairs(pairs: pd.DataFrame, rules: PreferenceRules) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(accepted, rejected with a `reason` each) under `rules`, in the pairs' order."""
    reasons: list[str | None] = []
    seen: set[tuple[str, str, str]] = set()
    for row in pairs.itertuples():
        reason = None
        for name in ("prompt", "chosen", "rejected"):
            text = str(getattr(row, name) or "")
            if not text.strip():
                reason = f"{name}: empty"
            elif len(text) > rules.max_chars:
                reason = f"{name}: {len(text)} characters, over max_chars {rules.max_chars}"
            elif label := _pii(text):
                reason = f"{name}: contains {label} (PII)"
            if reason:
                break
        key = (_normalized(row.prompt), _normalized(row.chosen), _normalized(row.rejected))
        if reason is None and key[1] == key[2]:
            reason = "chosen and rejected are the same answer"
        if reason is None and key in seen:
            reason = "duplicate of an earlier pair"
        seen.add(key)
        reasons.append(reason)
    checked = pairs.assign(reason=reasons)
    valid = checked[checked["reason"].isna()]
    cap = max(1, math.floor(rules.max_actor_share * len(valid)))
    rank = valid.groupby(valid["actors"].map(lambda a: a[-1] if a else "?")).cumcount()
    over = rank.index[rank >= cap]
    checked.loc[over, "reason"] = [f"actor {valid.loc[i, 'actors'][-1]} has {cap} pairs already "
                                   f"(max_actor_share {rules.max_actor_share})" for i in over]
    accepted = checked[checked["reason"].isna()].drop(columns="reason").reset_index(drop=True)
    return accepted, checked[checked["reason"].notna()].reset_index(drop=True)


def preference_set(rated: pd.DataFrame, rules: PreferenceRules) -> PreferenceSet:
    pairs, singles = build_pairs(rated)
    accepted, rejected = validate_pairs(pairs, rules)
    return PreferenceSet(accepted, singles, rejected)


def version_of(built: PreferenceSet, prompt_set_version: str) -> str:
    """Content hash of the accepted pairs and the prompt set they are rendered for."""
    digest = hashlib.sha256(prompt_set_version.encode())
    for record in built.pairs.to_dict(orient="records"):
        digest.update(json.dumps(record, sort_keys=True, default=str).encode() + b"\n")
    return digest.hexdigest()[:16]


def write_set(folder: Path, built: PreferenceSet, renderer, tokenizer=None) -> None:
    """pairs.jsonl rendered as the prompt set renders its records (`renderer`, a
    rendering.PromptRenderer: the conversation as the prompt, each answer as a completion), the
    question as `question`; singles.jsonl; rejected.jsonl with reasons."""
    from llmops_dagster.prompts.rendering import render_prompt

    with (folder / PAIRS_FILE).open("w", encoding="utf-8") as out:
        for record in built.pairs.to_dict(orient="records"):
            out.write(json.dumps({
                **record, "question": record["prompt"],
                "prompt": render_prompt(renderer, record["prompt"], record["context"], tokenizer),
                "chosen": renderer.completion(record["chosen"]),
                "rejected": renderer.completion(record["rejected"])}, default=str) + "\n")
    for name, frame in ((SINGLES_FILE, built.singles), (REJECTED_FILE, built.rejected)):
        frame.to_json(folder / name, orient="records", lines=True, force_ascii=False)


def read_pairs(path: str | Path) -> list[dict]:
    """The pairs of a preference set's pairs.jsonl (prompt rendered, chosen, rejected, lineage)."""
    from llmops_dagster.prompts.templates import read_records

    return read_records(Path(path))


def tokenizer_for(renderer, base_model_path: str):
    """The base model's tokenizer when `renderer` is its chat template (rendering needs it), else
    None: the prompts/ templates render without one."""
    from llmops_dagster.prompts.rendering import CHAT_TEMPLATE

    if renderer.kind != CHAT_TEMPLATE:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_model_path)


def reasons_markdown(built: PreferenceSet, limit: int = 10) -> str:
    """Rejected pairs by reason, the most frequent first."""
    if built.rejected.empty:
        return "No pair rejected."
    counts = built.rejected["reason"].value_counts().head(limit)
    return pd.DataFrame({"reason": counts.index, "pairs": counts.to_numpy()}).to_markdown(index=False)

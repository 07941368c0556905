"""Lineage of a served answer: response -> model version -> checkpoint -> prompt set -> dataset ->
the source rows it was trained on, nearest to the question first. Each link is read through the
module that owns its table (traffic_log, registry, templates, dataset_store, embeddings): no SQL
here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict

import numpy as np
import pandas as pd
import sqlalchemy as sa

from llmops_dagster.dataset import dataset_store, embeddings
from llmops_dagster.governance import registry
from llmops_dagster.prompts import templates
from llmops_dagster.prompts.rendering import embedding_text
from llmops_dagster.serving import traffic_log


class TraceError(LookupError):
    """A link of the chain is missing; the message names it."""


def _found(record, what: str) -> dict:
    """`record` (a dict, or a dataclass such as dataset_store.DatasetVersion) as a dict; a
    TraceError naming `what` when it is None."""
    if record is None:
        raise TraceError(f"{what} not found")
    return record if isinstance(record, dict) else asdict(record)


def trace(engine: sa.Engine, response_id: str, nearest: int = 5,
          embed: Callable[[list[str]], np.ndarray] | None = None) -> dict:
    """Every link from a response id back to the dataset rows, with the `nearest` training rows
    nearest to the question: ranked by the cosine distance of their prompt embeddings
    (dataset_embeddings) to the question's, embedded by `embed` (the embedder dataset_embeddings
    uses); without `embed` or stored embeddings, the first rows of the set, saying why."""
    response = traffic_log.served_response(engine, response_id)
    if response is None:
        raise TraceError(f"response {response_id!r} not found")
    with engine.connect() as connection:
        model = _found(registry.lineage_row(connection, response["model_version"]),
                       f"model version {response['model_version']!r} in the registry")
        prompt_set = _found(templates.recorded_prompt_set(connection, model["prompt_set_version"]),
                            f"prompt set {model['prompt_set_version']!r}")
        dataset = _found(dataset_store.recorded_dataset(connection, model["dataset_version"]),
                         f"dataset {model['dataset_version']!r}")
    rows = dataset_store.read_accepted(dataset["path"])
    train = rows[rows["split"] == "train"].set_index("_row_number", drop=False)
    from_feedback = train[train["feedback_id"].notna()] if "feedback_id" in train else train.iloc[:0]
    ranked, ranked_by = nearest_training_rows(engine, dataset["version"], train, response, nearest,
                                              embed)
    return {
        "response": response,
        "model_version": model,
        "prompt_set": prompt_set,
        "dataset": dataset,
        "training_rows": {
            "count": len(train),
            "from_feedback": len(from_feedback),
            "corrections": corrections_behind(engine, {
                int(r["feedback_id"]): {"question": r["prompt"], "corrected_answer": r["response"]}
                for _, r in from_feedback.iterrows()}),
            "source": dataset["source"],
            "nearest": ranked,
            "ranked_by": ranked_by,
        },
    }


def nearest_training_rows(engine: sa.Engine, dataset_version: str, train: pd.DataFrame,
                          response: dict, k: int, embed: Callable[[list[str]], np.ndarray] | None,
                          ) -> tuple[list[dict], str]:
    """The `k` rows of `train` (indexed by row number) nearest to the question `response` answered,
    each with its cosine distance, and how they were chosen (trace's rule)."""
    if embed is not None and embeddings.stored_rows(engine, dataset_version):
        question = embedding_text(response["prompt"], response.get("context"))
        found = embeddings.nearest_rows(engine, dataset_version, embed([question])[0], k)
        ranked = [{**_row(train.loc[number]), "distance": distance}
                  for number, distance in found if number in train.index]
        return ranked, "nearest to the question (cosine distance of the prompt embeddings)"
    why = ("no embedder given" if embed is None else
           f"dataset_embeddings holds no vectors of dataset {dataset_version}: materialize "
           "dataset_embeddings to rank the rows by nearness to the question")
    return [{**_row(r), "distance": None} for _, r in train.head(k).iterrows()], f"first rows ({why})"


def _row(row: pd.Series) -> dict:
    return {"row": int(row["_row_number"]), "prompt": row["prompt"], "response": row["response"]}


def corrections_behind(engine: sa.Engine, texts: dict[int, dict]) -> list[dict]:
    """Who stands behind each training row made from a correction (`texts`: feedback id -> the
    question and the corrected answer, as the training row holds them): its feedback id, the
    answer it corrected, the key it came with, and who accepted it when. A purged row says so (its
    audit record keeps who purged it and why)."""
    if not texts:
        return []
    found = traffic_log.correction_reviews(engine, sorted(texts))
    return [{**found.get(i, {"feedback_id": i, "response_id": None, "rater": None, "api_key": None,
                             "review_state": "purged", "reviewed_by": None, "reviewed_at": None}),
             **texts[i]}
            for i in sorted(texts)]


def trace_html(chain: dict, links: dict[str, dict]) -> str:
    """The trace as a standalone page: every link of the chain, each product linked to the exact
    materialization in the Dagster UI that made it (`links` from lineage.materialization_links).
    Every value is escaped: prompts and answers are whatever people sent and the model said."""
    from html import escape

    from llmops_dagster.infra.lineage import eval_report_version

    response, model = chain["response"], chain["model_version"]
    prompts, dataset, rows = chain["prompt_set"], chain["dataset"], chain["training_rows"]

    def product(asset: str, version: str) -> str:
        link = links.get(asset) or {}
        shown = f"<code>{escape(str(version))}</code>"
        if not link:
            return f"{escape(asset)} {shown} <em>(not materialized in this Dagster instance)</em>"
        return (f'<a href="{escape(link["url"])}">{escape(asset)}</a> {shown} '
                f'(<a href="{escape(link["run_url"])}">run {escape(link["run_id"][:8])}</a>)')

    nearest = "".join(
        f"<tr><td>{row['row']}</td><td>{_distance(row['distance'])}</td><td>{escape(row['prompt'])}</td>"
        f"<td>{escape(row['response'])}</td></tr>" for row in rows["nearest"])
    items = [
        ("served answer", f"<code>{escape(response['response_id'])}</code> at "
                          f"{escape(str(response['created_at']))}<br>"
                          + "".join(f"{escape(turn['role'])}: {escape(turn['content'])}<br>"
                                    for turn in response.get("context") or [])
                          + f"prompt: {escape(response['prompt'])}"
                          f"<br>answer: {escape(response['response'])}"),
        ("model version", f"{product('serving_deployment', model['version'])}<br>"
                          f"{product('approved_model', model['version'])}: {escape(model['stage'])}, "
                          f"approved by {escape(str(model['approver']))}"),
        ("eval report", product("eval_report", eval_report_version(model["eval_report_id"]))
         if model["eval_report_id"] is not None else "none"),
        ("fine-tune", f"{product('finetuned_checkpoint', model['version'])}<br>checkpoint "
                      f"<code>{escape(model['checkpoint_path'])}</code>"),
        ("base model", product("base_model", model["base_model_version"])),
        ("prompt set", f"{product('prompt_set', prompts['version'])}: template "
                       f"{escape(prompts['template_name'])}, {prompts['train_rows']} train / "
                       f"{prompts['eval_rows']} eval"),
        ("dataset", f"{product('validated_dataset', dataset['version'])} from "
                    f"<code>{escape(dataset['source'])}</code>: {dataset['rows_input']} in = "
                    f"{dataset['rows_accepted']} accepted + {dataset['rows_quarantined']} quarantined"
                    f"<br>{product('raw_examples', dataset['input_hash'])}"),
    ]
    body = "".join(f"<tr><th>{escape(name)}</th><td>{value}</td></tr>" for name, value in items)
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>trace {escape(response['response_id'])}</title>"
        "<style>body{font:14px system-ui,sans-serif;margin:2em;max-width:70em}"
        "th{text-align:left;vertical-align:top;padding:.4em 1em .4em 0}td{padding:.4em 0}"
        "table.rows td{border-top:1px solid #ddd;padding:.3em .6em}</style></head><body>"
        f"<h1>Trace of a served answer</h1><table>{body}</table>"
        f"<h2>Training rows ({rows['count']}, {rows['from_feedback']} from feedback): "
        f"{len(rows['nearest'])} {escape(rows['ranked_by'])}</h2><table class=rows><tr><th>row</th>"
        f"<th>cosine distance</th><th>prompt</th><th>response</th></tr>"
        f"{nearest}</table>{_corrections_html(rows['corrections'])}</body></html>")


def _distance(distance: float | None) -> str:
    return "-" if distance is None else f"{distance:.4f}"


def _corrections_html(corrections: list[dict]) -> str:
    from html import escape

    if not corrections:
        return ""
    columns = ("feedback", "question", "corrected answer", "answer corrected", "rater", "sent with",
               "review", "reviewer", "at")
    body = "".join(
        "<tr>" + "".join(f"<td>{escape(str(value))}</td>" for value in (
            c["feedback_id"], c["question"], c["corrected_answer"], c["response_id"], c["rater"],
            c["api_key"] or "feedback token",
            c["review_state"], c["reviewed_by"], c["reviewed_at"])) + "</tr>"
        for c in corrections)
    head = "".join(f"<th>{name}</th>" for name in columns)
    return (f"<h2>Training rows from people's corrections</h2><table class=rows><tr>{head}</tr>"
            f"{body}</table>")

"""Lineage of a served answer: response -> model version -> checkpoint -> prompt set -> dataset ->
the source rows it was trained on. Each link is read through the module that owns its table
(traffic_log, registry, templates, dataset_store): no SQL here."""

from __future__ import annotations

from dataclasses import asdict

import sqlalchemy as sa

from llmops_dagster.dataset import dataset_store
from llmops_dagster.governance import registry
from llmops_dagster.prompts import templates
from llmops_dagster.serving import traffic_log


class TraceError(LookupError):
    """A link of the chain is missing; the message names it."""


def _found(record, what: str) -> dict:
    """`record` (a dict, or a dataclass such as dataset_store.DatasetVersion) as a dict; a
    TraceError naming `what` when it is None."""
    if record is None:
        raise TraceError(f"{what} not found")
    return record if isinstance(record, dict) else asdict(record)


def trace(engine: sa.Engine, response_id: str, sample_rows: int = 5) -> dict:
    """Every link from a response id back to the dataset rows; `sample_rows` rows are included."""
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
    train = rows[rows["split"] == "train"]
    feedback_ids = (sorted(int(i) for i in train["feedback_id"].dropna()) if "feedback_id" in train
                    else [])
    sample = train.head(sample_rows)
    return {
        "response": response,
        "model_version": model,
        "prompt_set": prompt_set,
        "dataset": dataset,
        "training_rows": {
            "count": len(train),
            "from_feedback": len(feedback_ids),
            "corrections": corrections_behind(engine, feedback_ids),
            "source": dataset["source"],
            "sample": [{"row": int(r["_row_number"]), "prompt": r["prompt"], "response": r["response"]}
                       for _, r in sample.iterrows()],
        },
    }


def corrections_behind(engine: sa.Engine, feedback_ids: list[int]) -> list[dict]:
    """Who stands behind each training row made from a correction: its feedback id, the answer it
    corrected, the key it came with, and who accepted it when. A purged row says so (its audit
    record keeps who purged it and why)."""
    if not feedback_ids:
        return []
    found = traffic_log.correction_reviews(engine, feedback_ids)
    return [found.get(i, {"feedback_id": i, "response_id": None, "rater": None, "api_key": None,
                          "review_state": "purged", "reviewed_by": None, "reviewed_at": None})
            for i in feedback_ids]


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

    sample = "".join(
        f"<tr><td>{row['row']}</td><td>{escape(row['prompt'])}</td><td>{escape(row['response'])}</td></tr>"
        for row in rows["sample"])
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
        f"<h2>Training rows ({rows['count']}, {rows['from_feedback']} from feedback); first "
        f"{len(rows['sample'])}</h2><table class=rows><tr><th>row</th><th>prompt</th><th>response</th></tr>"
        f"{sample}</table>{_corrections_html(rows['corrections'])}</body></html>")


def _corrections_html(corrections: list[dict]) -> str:
    from html import escape

    if not corrections:
        return ""
    columns = ("feedback", "answer corrected", "rater", "sent with", "review", "reviewer", "at")
    body = "".join(
        "<tr>" + "".join(f"<td>{escape(str(value))}</td>" for value in (
            c["feedback_id"], c["response_id"], c["rater"], c["api_key"] or "feedback token",
            c["review_state"], c["reviewed_by"], c["reviewed_at"])) + "</tr>"
        for c in corrections)
    head = "".join(f"<th>{name}</th>" for name in columns)
    return (f"<h2>Training rows from people's corrections</h2><table class=rows><tr>{head}</tr>"
            f"{body}</table>")

"""Lineage of a served answer: response -> model version -> checkpoint -> prompt set -> dataset ->
the source rows it was trained on."""

from __future__ import annotations

import sqlalchemy as sa

from llmops_dagster.dataset.dataset_store import read_accepted
from llmops_dagster.serving import traffic_log


class TraceError(LookupError):
    """A link of the chain is missing; the message names it."""


def _one(connection, sql: str, what: str, **params) -> dict:
    row = connection.execute(sa.text(sql), params).mappings().first()
    if row is None:
        raise TraceError(f"{what} not found")
    return dict(row)


def trace(engine: sa.Engine, response_id: str, sample_rows: int = 5) -> dict:
    """Every link from a response id back to the dataset rows; `sample_rows` rows are included."""
    response = traffic_log.served_response(engine, response_id)
    if response is None:
        raise TraceError(f"response {response_id!r} not found")
    with engine.connect() as connection:
        model = _one(connection, "SELECT version, stage, approver, checkpoint_path, adapter_path, "
                     "merged_model_path, prompt_set_version, dataset_version, base_model_version, "
                     "eval_report_id FROM model_versions WHERE version = :v",
                     f"model version {response['model_version']!r} in the registry",
                     v=response["model_version"])
        prompt_set = _one(connection, "SELECT version, template_name, template_sha, path, train_rows, "
                          "eval_rows FROM prompt_set_versions WHERE version = :v",
                          f"prompt set {model['prompt_set_version']!r}", v=model["prompt_set_version"])
        dataset = _one(connection, "SELECT version, source, input_hash, path, rows_input, rows_accepted, "
                       "rows_quarantined FROM dataset_versions WHERE version = :v",
                       f"dataset {model['dataset_version']!r}", v=model["dataset_version"])
    rows = read_accepted(dataset["path"])
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
    with engine.connect() as connection:
        found = {r["feedback_id"]: dict(r) for r in connection.execute(
            sa.text("SELECT f.id AS feedback_id, f.response_id::text AS response_id, f.rater, "
                    "k.name AS api_key, f.review_state, f.reviewed_by, f.reviewed_at FROM feedback f "
                    "LEFT JOIN api_keys k ON k.id = f.api_key_id WHERE f.id = ANY(:ids)"),
            {"ids": feedback_ids}).mappings()}
    return [found.get(i, {"feedback_id": i, "response_id": None, "rater": None, "api_key": None,
                          "review_state": "purged", "reviewed_by": None, "reviewed_at": None})
            for i in feedback_ids]


def trace_html(chain: dict, links: dict[str, dict]) -> str:
    """The trace as a standalone page: every link of the chain, each product linked to the exact
    materialization in the Dagster UI that made it (`links` from lineage.materialization_links).
    Every value is escaped: prompts and answers are whatever people sent and the model said."""
    from html import escape

    from llmops_dagster.lineage import eval_report_version

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

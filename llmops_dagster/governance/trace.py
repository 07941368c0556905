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
    from_feedback = int(train["feedback_id"].notna().sum()) if "feedback_id" in train else 0
    sample = train.head(sample_rows)
    return {
        "response": response,
        "model_version": model,
        "prompt_set": prompt_set,
        "dataset": dataset,
        "training_rows": {
            "count": len(train),
            "from_feedback": from_feedback,
            "source": dataset["source"],
            "sample": [{"row": int(r["_row_number"]), "prompt": r["prompt"], "response": r["response"]}
                       for _, r in sample.iterrows()],
        },
    }

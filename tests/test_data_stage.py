"""dg.materialize of the data stage on the real embedded PostgreSQL + pgvector and the real
MiniLM embedder: the happy path, a messy file, and a file without a required column."""

import json

import dagster as dg
import sqlalchemy as sa

from assets.base_model import base_model
from assets.dataset import dataset_embeddings, raw_examples, validated_dataset
from assets.prompts import prompt_set
from llmops_dagster.dataset.synthetic_data import generate_examples

DATA_STAGE = [raw_examples, validated_dataset, base_model, prompt_set, dataset_embeddings]


def materialize(resources, instance, source="synthetic", rows=300, selection=None):
    return dg.materialize(
        DATA_STAGE,
        selection=selection,
        resources=resources,
        instance=instance,
        raise_on_error=False,
        run_config=(
            {} if selection else
            {"ops": {"raw_examples": {"config": {"source": source, "synthetic_rows": rows}}}}
        ),
    )


def metadata(result, asset) -> dict:
    [event] = result.asset_materializations_for_node(asset.key.path[-1])
    return {k: v.value for k, v in event.metadata.items()}


def validation_pii(text: str) -> list[str]:
    """The PII labels whose pattern still matches `text`."""
    import re

    from llmops_dagster.dataset.validation import PII_PATTERNS

    return [label for label, pattern in PII_PATTERNS.items() if re.search(pattern, text)]


def check_evaluation(result, name: str = "quarantine_within_threshold"):
    """The blocking quarantine check's evaluation (the feedback budget check is the other one)."""
    [evaluation] = [e for e in result.get_asset_check_evaluations() if e.asset_check_key.name == name]
    return evaluation


def test_data_stage_materializes_on_the_embedded_default(resources, instance):
    result = materialize(resources, instance)
    assert result.success
    dataset = metadata(result, validated_dataset)
    assert dataset["rows_input"] == 300 == dataset["rows_accepted"] + dataset["rows_quarantined"]
    assert check_evaluation(result).passed

    prompts = metadata(result, prompt_set)
    assert prompts["dataset_version"] == dataset["version"]
    assert prompts["train_rows"] + prompts["eval_rows"] == dataset["rows_accepted"]
    train_file = resources["artifacts"].version_dir("prompt_sets", prompts["version"]) / "train.jsonl"
    first = json.loads(train_file.read_text().splitlines()[0])
    assert first["prompt"].startswith("You are the Aurora") and first["completion"].strip()

    embedded = metadata(result, dataset_embeddings)
    assert embedded["rows"] == embedded["rows_added"] == prompts["train_rows"]
    with resources["database"].engine().connect() as connection:
        nearest = connection.execute(
            sa.text(
                "SELECT b.prompt FROM dataset_embeddings a, dataset_embeddings b "
                "WHERE a.dataset_version = :v AND b.dataset_version = :v AND a.id <> b.id "
                "ORDER BY a.id, a.embedding <=> b.embedding LIMIT 1"
            ),
            {"v": dataset["version"]},
        ).scalar_one()
        versions = connection.execute(
            sa.text("SELECT rows_accepted FROM dataset_versions WHERE version = :v"),
            {"v": dataset["version"]},
        ).scalar_one()
    assert nearest and versions == dataset["rows_accepted"]

    again = materialize(resources, instance, selection=[dataset_embeddings])
    assert again.success
    repeat = metadata(again, dataset_embeddings)
    assert repeat["rows_added"] == 0 and repeat["rows"] == embedded["rows"]


def write_messy_file(path):
    """60 good rows, then one row of each kind of bad input; returns {line: expected reason}."""
    good = [json.dumps(r) for r in generate_examples(n_rows=60, seed=3)]
    base = {"response": "We will look into it.", "intent": "billing_question"}
    bad = {
        61: (json.dumps({**base, "prompt": None}), "prompt: value is missing"),
        62: (json.dumps({**base, "prompt": "x " * 200}), "prompt: 200 tokens, outside the bounds"),
        63: (json.dumps({**base, "prompt": "Mail me: ann@mail.example.com"}), "prompt: contains an e-mail"),
        64: (json.dumps({**base, "prompt": "Call me at (212) 555-0100"}), "prompt: contains a phone"),
        65: (json.dumps({**base, "prompt": "Refund card 5500 0000 0000 0004"}),
             "prompt: contains a payment card"),
        66: (good[0], "exact duplicate of row 1"),
        67: ('{"prompt": "Caf\xe9 order", "response": "ok", "intent": "x"}', "not valid UTF-8"),
        68: (json.dumps({**base, "prompt": ["a", "list"]}), "prompt: expected text, got ['a', 'list']"),
        69: (json.dumps({**base, "prompt": "Is my doorbell covered?", "split": "train"}), None),
        70: (json.dumps({**base, "prompt": "is my doorbell  COVERED?", "split": "eval"}),
             "train/eval leakage: the prompt is also in the train split at row 69"),
    }
    lines = [line.encode() for line in good]
    for _, (line, _) in sorted(bad.items()):
        lines.append(line.encode("latin-1") if "\xe9" in line else line.encode())
    path.write_bytes(b"\n".join(lines) + b"\n")
    return {row: reason for row, (_, reason) in bad.items() if reason}


def test_messy_file_is_quarantined_row_by_row_and_blocks_downstream(resources, instance, tmp_path):
    source = tmp_path / "messy.jsonl"
    expected = write_messy_file(source)
    result = materialize(resources, instance, source=str(source))

    dataset = metadata(result, validated_dataset)
    assert dataset["rows_input"] == 70
    assert dataset["rows_quarantined"] == len(expected) == 9
    assert dataset["rows_accepted"] + dataset["rows_quarantined"] == dataset["rows_input"]
    check = check_evaluation(result)
    assert not check.passed
    assert "9 of 70 source rows quarantined (12.9%), above the 5.0% threshold" in check.description
    assert "row 61: prompt: value is missing" in check.description
    assert not result.asset_materializations_for_node("prompt_set")  # blocked by the check

    with resources["database"].engine().connect() as connection:
        stored = connection.execute(
            sa.text("SELECT row_number, reasons, original_row, source FROM quarantine_rows "
                    "WHERE input_hash = :h ORDER BY row_number"),
            {"h": dataset["input_hash"]},
        ).all()
    assert [row.row_number for row in stored] == sorted(expected)
    for row in stored:
        assert any(reason.startswith(expected[row.row_number]) for reason in row.reasons), row
        assert row.source == str(source)
        assert json.loads(row.original_row)  # the whole original row is kept
    assert "Caf\\xe9 order" in json.loads(stored[6].original_row)["_raw"]
    pii = [json.loads(row.original_row) for row in stored if "(PII)" in " ".join(row.reasons)]
    assert len(pii) == 3 and all("*" in json.dumps(row) for row in pii)  # kept, but masked
    assert not any(validation_pii(json.dumps(row)) for row in pii)


def test_missing_required_column_fails_the_check_naming_it(resources, instance, tmp_path):
    source = tmp_path / "no_response.csv"
    source.write_text("prompt,intent\nWhere is order A10001?,order_status\nReset my hub,reset\n")
    result = materialize(resources, instance, source=str(source))
    check = check_evaluation(result)
    assert not check.passed
    assert check.description.startswith("required column(s) 'response' missing from the source")
    dataset = metadata(result, validated_dataset)
    assert dataset["rows_quarantined"] == 2 and dataset["rows_accepted"] == 0
    assert not result.asset_materializations_for_node("prompt_set")


def test_a_new_dataset_version_reuses_vectors_of_the_same_prompt_and_model(fresh_database):
    """Vectors are copied for prompts an earlier version embedded with the same model, never from
    another model, nor from rows whose model is unknown."""
    import numpy as np

    from llmops_dagster.dataset import embeddings

    engine = fresh_database.engine()
    with engine.begin() as connection:
        for version in ("d1", "d2", "d3", "d4"):
            connection.execute(sa.text(
                "INSERT INTO dataset_versions (version, input_hash, source, path, rows_input, "
                "rows_accepted, rows_quarantined) VALUES (:v, :v, 'synthetic', '/nowhere', 1, 1, 0)"),
                {"v": version})
    prompts = [f"where is order A{10000 + i}?" for i in range(10)]
    vectors = np.random.default_rng(0).normal(size=(10, 384)).astype(np.float32)
    embeddings.store_embeddings(engine, "d1", list(range(10)), prompts, vectors, "model-a")
    embeddings.store_embeddings(engine, "d4", [0], ["an old row"], vectors[:1], "")

    # d2: rows renumbered, half the prompts known, one new prompt, one prompt known only as ''.
    rows, texts = [100, 101, 102, 103, 104, 105, 106], [*prompts[:5], "a new question", "an old row"]
    assert embeddings.reuse_embeddings(engine, "d2", "model-a", rows, texts) == {100, 101, 102, 103, 104}
    with engine.connect() as connection:
        copied = connection.execute(sa.text(
            "SELECT row_number, embedding::text FROM dataset_embeddings WHERE dataset_version = 'd2' "
            "ORDER BY row_number")).all()
    assert np.allclose(np.array([json.loads(v) for _, v in copied]), vectors[:5], atol=1e-6)
    assert embeddings.reuse_embeddings(engine, "d3", "model-b", rows, texts) == set()

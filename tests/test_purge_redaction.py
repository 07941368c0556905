"""A purge reaches every file made from the purged correction: its examples are cut from the
dataset and prompt-set versions (which keep their names and record the redaction), the model
versions trained on it are flagged, and nothing under the artifact root is readable by others.

Touches: a database of each test's own (fresh_database), an artifact root under tmp_path, the real
raw_examples and validated_dataset assets (200 synthetic rows) in a Dagster instance of its own; the
prompt set is written by the prompt stage's library functions (the asset also needs a base model)."""

import json
import os
import stat
import subprocess
import uuid
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
import sqlalchemy as sa

from llmops_dagster.dataset import dataset_store
from llmops_dagster.feedback import curation, redaction, review
from llmops_dagster.governance import registry
from llmops_dagster.infra.settings import PROMPTS_DIR
from llmops_dagster.prompts import templates

SECRET = "Order Z77 goes to 12 Secret Lane, Springfield."
KEPT = "Order K11 is cancelled."


def accepted_correction(engine: sa.Engine, prompt: str, correction: str) -> int:
    """An answer, its down-vote with a correction, accepted by a person and curated; its id."""
    from llmops_dagster.serving import traffic_log

    response_id = str(uuid.uuid4())
    with engine.begin() as connection:
        connection.execute(sa.text(
            "INSERT INTO request_log (response_id, model_version, prompt, response, max_new_tokens, "
            "latency_ms) VALUES (:id, 'v0', :prompt, 'no idea', 8, 1.0)"),
            {"id": response_id, "prompt": prompt})
        feedback_id = connection.execute(sa.text(
            "INSERT INTO feedback (response_id, client_id, rating, correction, rater, credential, counted, "
            "review_state) VALUES (:id, 'c', -1, :correction, :rater, 'feedback_token', true, 'pending') "
            "RETURNING id"), {"id": response_id, "correction": correction, "rater": f"token:{response_id}"}
        ).scalar_one()
    review.decide(engine, feedback_id, "accept", actor="ops-person")
    rows = traffic_log.uncurated_feedback(engine, limit=100)
    curation.store_curated(engine, rows, [[0.0] * 384 for _ in range(len(rows))])
    return feedback_id


def texts_under(root: Path) -> str:
    """Every file's text under `root`, Parquet files as their rows (their pages are compressed)."""
    parts = []
    for path in root.rglob("*"):
        if path.is_file():
            parts.append(pd.read_parquet(path).to_json() if path.suffix == ".parquet"
                         else path.read_bytes().decode("utf-8", "replace"))
    return "\n".join(parts)


def loose_modes(root: Path) -> list[str]:
    """Paths under `root` (itself included) that a group or other user may read, write or enter."""
    return [f"{p} {stat.filemode(p.stat().st_mode)}" for p in [root, *root.rglob("*")]
            if stat.S_IMODE(p.stat().st_mode) & 0o077]


def register(engine: sa.Engine, version: str, dataset_version: str, prompt_set_version: str,
             init_adapter: str | None = None) -> None:
    registry.register_candidate(
        engine, version=version, dataset_version=dataset_version, prompt_set_version=prompt_set_version,
        base_model_version="base", checkpoint_path=f"/ft/{version}/deepspeed",
        adapter_path=f"/ft/{version}/adapter", merged_model_path=f"/ft/{version}/merged",
        train_config={"init_adapter": init_adapter}, eval_report_id=None)


@pytest.fixture
def prompt_set_with_corrections(resources):
    """Two accepted corrections in a validated dataset and its prompt set, as the stages make them."""
    from assets.dataset import raw_examples, validated_dataset

    engine = resources["database"].engine()
    purged = accepted_correction(engine, "Where does order Z77 go?", SECRET)
    kept = accepted_correction(engine, "Please cancel order K11", KEPT)
    with dg.instance_for_test() as instance:
        result = dg.materialize([raw_examples, validated_dataset], resources=resources, instance=instance,
                                run_config={"ops": {"raw_examples": {"config": {"synthetic_rows": 200}}}})
        assert result.success
        [event] = result.asset_materializations_for_node("validated_dataset")
    dataset = {k: v.value for k, v in event.metadata.items()}
    assert dataset["rows_from_feedback"] == 2, dataset
    renderer = templates.load_template(PROMPTS_DIR, "customer_support.v1")
    records = templates.render_records(renderer, dataset_store.read_accepted(dataset["path"]))
    version = templates.prompt_set_version(renderer, dataset["version"])
    folder = resources["artifacts"].write_version(
        "prompt_sets", version, lambda d: templates.write_prompt_set(d, records, renderer))
    counts = records["split"].value_counts()
    templates.record_prompt_set_version(engine, version, dataset["version"], renderer, folder,
                                        int(counts.get("train", 0)), int(counts.get("eval", 0)))
    return {"purged": purged, "kept": kept, "dataset": dataset["version"],
            "dataset_path": Path(dataset["path"]), "prompt_set": version, "prompt_set_path": folder}


def test_a_purged_correction_is_redacted_from_its_prompt_set_and_its_models_flagged(
        resources, prompt_set_with_corrections):
    engine = resources["database"].engine()
    root = resources["artifacts"].root_path()
    made = prompt_set_with_corrections
    prompt_files = [made["prompt_set_path"] / name for name in templates.SPLIT_FILES.values()]
    assert SECRET in "".join(p.read_text() for p in prompt_files)  # it went in
    assert SECRET in texts_under(root)
    # Trained on it: directly, and warm-started from that adapter on other data; one is not.
    register(engine, "ft-direct", made["dataset"], made["prompt_set"])
    register(engine, "ft-warm", "older-data", "older-prompts", init_adapter="/ft/ft-direct/adapter")
    register(engine, "ft-other", "older-data", "older-prompts")

    result = review.purge(engine, review.PurgeFilter(ids=(made["purged"],)), actor="dpo",
                          reason="erasure request")

    assert result == [made["purged"]]
    assert SECRET not in texts_under(root)
    assert KEPT in "".join(p.read_text() for p in prompt_files)  # only the purged row is cut
    assert made["prompt_set_path"].is_dir() and made["dataset_path"].is_dir()  # versions keep their names
    redacted = {(r.kind, Path(r.path).name) for r in result.redactions}
    assert ("datasets", dataset_store.ACCEPTED_FILE) in redacted
    assert {("prompt_sets", "train.jsonl"), ("prompt_sets", "eval.jsonl")} & redacted
    for folder in (made["dataset_path"], made["prompt_set_path"]):
        entries = json.loads((folder / redaction.REDACTIONS_FILE).read_text())
        assert entries and all(e["feedback_ids"] == [made["purged"]] and e["actor"] == "dpo"
                               for e in entries)
    with engine.connect() as connection:
        recorded = connection.execute(sa.text(
            "SELECT kind, version, feedback_ids, rows_removed FROM artifact_redactions")).all()
    assert {(r.kind, r.version) for r in recorded} == {("datasets", made["dataset"]),
                                                       ("prompt_sets", made["prompt_set"])}
    assert all(r.feedback_ids == [made["purged"]] and r.rows_removed == 1 for r in recorded)

    assert result.flagged == {"ft-direct": [made["purged"]], "ft-warm": [made["purged"]]}
    assert registry.get(engine, "ft-direct").purged_feedback == [made["purged"]]
    assert registry.get(engine, "ft-warm").purged_feedback == [made["purged"]]
    assert registry.get(engine, "ft-other").purged_feedback == []
    # A fine-tune of that data registered after the purge is flagged as it arrives.
    register(engine, "ft-later", made["dataset"], made["prompt_set"])
    assert registry.get(engine, "ft-later").purged_feedback == [made["purged"]]

    lines = result.report_lines()
    assert any(line.startswith("flagged model version ft-direct") for line in lines), lines
    assert any(f"prompt_sets {made['prompt_set']}" in line for line in lines), lines
    accepted, record = review.audit_trail(engine, made["purged"])
    assert (accepted["action"], record["action"]) == ("accepted", "purged")
    assert record["details"]["flagged_versions"] == ["ft-direct", "ft-warm"]
    assert SECRET not in json.dumps(record["details"], default=str)

    assert loose_modes(root) == []
    assert stat.S_IMODE(root.stat().st_mode) == 0o700


def test_purging_again_finds_nothing_left_to_redact(resources, prompt_set_with_corrections):
    engine = resources["database"].engine()
    made = prompt_set_with_corrections
    review.purge(engine, review.PurgeFilter(ids=(made["purged"],)), actor="dpo", reason="erasure")
    again = review.purge(engine, review.PurgeFilter(ids=(made["purged"], made["kept"])), actor="dpo",
                         reason="erasure")
    assert again == [made["kept"]]
    assert {tuple(r.feedback_ids) for r in again.redactions} == {(made["kept"],)}


def test_a_run_writes_artifacts_only_its_user_reads(tmp_path):
    """What a run writes under the artifact root, by itself or through a process it starts (as the
    fine-tune's ranks are), is 0600 in 0700 folders; the process's umask is restored after."""
    from resources.artifacts import ArtifactStore

    @dg.asset
    def finetune_like(artifacts: ArtifactStore) -> None:
        output = artifacts.version_dir("finetunes", "v1")
        subprocess.run(["sh", "-c", 'mkdir -p "$1/deepspeed/global_step2" "$1/merged" && '
                        'echo weights > "$1/deepspeed/global_step2/mp_rank_00_model_states.pt" && '
                        'echo config > "$1/merged/config.json"', "sh", str(output)], check=True)
        artifacts.write_version("prompt_sets", "p1", lambda d: (d / "train.jsonl").write_text("{}\n"))

    umask = os.umask(0o022)
    os.umask(umask)
    root = tmp_path / "artifacts"
    assert dg.materialize([finetune_like], resources={"artifacts": ArtifactStore(root=str(root))}).success
    assert (root / "finetunes" / "v1" / "merged" / "config.json").is_file()
    assert loose_modes(root) == []
    assert os.umask(umask) == umask


def test_a_correction_purged_while_its_dataset_was_made_is_cut_when_it_is_recorded(fresh_database,
                                                                                   tmp_path):
    """The run read the correction before the purge; the purge could not see the unpublished
    version; recording the version cuts it."""
    engine = fresh_database.engine()
    kept = accepted_correction(engine, "Please cancel order K11", KEPT)
    folder = tmp_path / "datasets" / "d1"
    folder.mkdir(parents=True)
    dataset_store.write_accepted(folder, pd.DataFrame({
        "prompt": ["How do I return shoes?", "Please cancel order K11", "Where does order Z77 go?"],
        "response": ["Use the return form.", KEPT, SECRET],
        "feedback_id": pd.array([None, kept, kept + 1], dtype="Int64"),
        "_row_number": [1, 2, 3]}))
    with engine.begin() as connection:
        assert redaction.redact_purged(connection, "d1", folder) == [kept + 1]
    accepted = dataset_store.read_accepted(folder)
    assert accepted["response"].tolist() == ["Use the return form.", KEPT]
    with engine.connect() as connection:
        recorded = connection.execute(sa.text(
            "SELECT kind, version, feedback_ids FROM artifact_redactions")).one()
    assert tuple(recorded) == ("datasets", "d1", [kept + 1])

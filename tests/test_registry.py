"""The model registry on the embedded PostgreSQL: promotions, rollback, rejection, the database's own
guards (one production row, append-only audit log), concurrent transitions from several processes, and
the `llmops models` commands. Every test works in a fresh database of its own."""

import multiprocessing
import uuid

import pytest
import sqlalchemy as sa

from llmops_dagster import cli
from llmops_dagster.governance import registry
from llmops_dagster.infra import database


@pytest.fixture
def db_url(platform_db) -> str:
    return database.ensure_database(platform_db.admin_url(), f"registry_{uuid.uuid4().hex}")


@pytest.fixture
def engine(db_url) -> sa.Engine:
    return database.platform_engine(db_url)


def _register(engine: sa.Engine, version: str, eval_report_id: int | None = None) -> registry.ModelVersion:
    return registry.register_candidate(
        engine,
        version=version,
        dataset_version="ds-1",
        prompt_set_version="ps-1",
        base_model_version="base-1",
        checkpoint_path=f"/artifacts/{version}/checkpoints",
        adapter_path=f"/artifacts/{version}/adapter",
        merged_model_path=f"/artifacts/{version}/merged",
        train_config={"lr": 2e-4, "lora": {"r": 8}},
        eval_report_id=eval_report_id,
    )


def _eval_report(engine: sa.Engine, candidate: str) -> int:
    with engine.begin() as connection:
        return connection.execute(
            sa.text(
                "INSERT INTO eval_reports (candidate_version, dataset_version, prompt_set_version, "
                "metrics, slices, comparison) VALUES (:candidate, 'ds-1', 'ps-1', '{}', '{}', '{}') "
                "RETURNING id"
            ),
            {"candidate": candidate},
        ).scalar_one()


def _transitions(engine: sa.Engine) -> list[tuple]:
    return [(e["version"], e["from_stage"], e["to_stage"], e["actor"]) for e in registry.audit_log(engine)]


def test_register_is_idempotent_and_takes_a_newer_eval_report(engine):
    first = _register(engine, "ft-1")
    assert (first.stage, first.eval_report_id) == ("candidate", None)
    assert first.train_config == {"lr": 2e-4, "lora": {"r": 8}}
    assert _register(engine, "ft-1") == first
    report_id = _eval_report(engine, "ft-1")
    assert _register(engine, "ft-1", eval_report_id=report_id).eval_report_id == report_id
    assert _register(engine, "ft-1").eval_report_id == report_id
    assert [(e["from_stage"], e["to_stage"], e["reason"]) for e in registry.audit_log(engine)] == [
        (None, "candidate", "registered")
    ]


def test_promoting_a_second_candidate_archives_the_first(engine):
    _register(engine, "ft-1")
    _register(engine, "ft-2")
    assert registry.production(engine) is None

    promoted = registry.promote(engine, "ft-1", actor="alice", reason="beats the base model")
    assert (promoted.stage, promoted.approver) == ("production", "alice")
    assert promoted.reason == "beats the base model"
    assert registry.promote(engine, "ft-1", actor="carol", reason="again") == promoted  # a no-op
    registry.promote(engine, "ft-2", actor="policy", reason="passed the policy")

    assert registry.production(engine).version == "ft-2"
    first = registry.get(engine, "ft-1")
    assert (first.stage, first.approver) == ("archived", "alice")
    assert [m.version for m in registry.list_versions(engine)] == ["ft-2", "ft-1"]
    assert _transitions(engine) == [
        ("ft-1", None, "candidate", "policy"),
        ("ft-2", None, "candidate", "policy"),
        ("ft-1", "candidate", "production", "alice"),
        ("ft-1", "production", "archived", "policy"),
        ("ft-2", "candidate", "production", "policy"),
    ]
    reasons = [e["reason"] for e in registry.audit_log(engine, "ft-1")]
    assert reasons == ["registered", "beats the base model", "superseded by 'ft-2': passed the policy"]


def test_rollback_restores_the_previous_production_version(engine):
    for version in ("ft-1", "ft-2", "ft-3"):
        _register(engine, version)
        registry.promote(engine, version, actor="policy", reason="passed the policy")

    restored = registry.rollback(engine, actor="bob", reason="latency regression")
    assert (restored.version, restored.stage, restored.approver) == ("ft-2", "production", "bob")
    assert registry.get(engine, "ft-3").stage == "archived"
    assert registry.get(engine, "ft-1").stage == "archived"
    last_two = registry.audit_log(engine)[-2:]
    assert [(e["version"], e["from_stage"], e["to_stage"], e["actor"]) for e in last_two] == [
        ("ft-3", "production", "archived", "bob"),
        ("ft-2", "archived", "production", "bob"),
    ]
    assert all("latency regression" in e["reason"] for e in last_two)


def test_rollback_needs_a_production_and_a_previous_version(engine):
    _register(engine, "ft-1")
    with pytest.raises(registry.RegistryError, match="no model version is in production"):
        registry.rollback(engine, actor="bob", reason="bad answers")
    registry.promote(engine, "ft-1", actor="alice", reason="first model")
    with pytest.raises(
        registry.RegistryError, match="'ft-1' is the first production version; there is no previous version"
    ):
        registry.rollback(engine, actor="bob", reason="bad answers")
    assert registry.production(engine).version == "ft-1"


def test_rejected_versions_stay_out_of_production(engine):
    _register(engine, "ft-1")
    _register(engine, "ft-2")
    rejected = registry.reject(engine, "ft-1", actor="policy", reason="token F1 below 0.5")
    assert (rejected.stage, rejected.reason) == ("rejected", "token F1 below 0.5")
    with pytest.raises(registry.RegistryError, match="model version 'ft-1' was rejected"):
        registry.promote(engine, "ft-1", actor="alice", reason="override")

    registry.promote(engine, "ft-2", actor="alice", reason="good")
    with pytest.raises(registry.RegistryError, match="'ft-2' is in production .* roll back instead"):
        registry.reject(engine, "ft-2", actor="bob", reason="bad")
    with pytest.raises(registry.RegistryError, match="model version 'ft-9' is not in the registry"):
        registry.get(engine, "ft-9")
    assert registry.production(engine).version == "ft-2"


def test_the_database_allows_one_production_row_and_an_append_only_log(engine):
    _register(engine, "ft-1")
    _register(engine, "ft-2")
    registry.promote(engine, "ft-1", actor="alice", reason="good")
    with pytest.raises(sa.exc.IntegrityError, match="model_versions_one_production"):
        with engine.begin() as connection:
            connection.execute(
                sa.text("UPDATE model_versions SET stage = 'production' WHERE version = :version"),
                {"version": "ft-2"},
            )

    for statement, operation in [
        ("UPDATE model_audit_log SET reason = 'rewritten'", "UPDATE"),
        ("DELETE FROM model_audit_log", "DELETE"),
        ("TRUNCATE model_audit_log", "TRUNCATE"),
    ]:
        with pytest.raises(sa.exc.DBAPIError, match=f"model_audit_log is append-only: {operation} refused"):
            with engine.begin() as connection:
                connection.execute(sa.text(statement))
    assert len(registry.audit_log(engine)) == 3


def _registry_worker(url: str, action: str, version: str | None, barrier, results) -> None:
    """One process: wait for all the others, then promote `version` or roll back; report the outcome."""
    engine = database.platform_engine(url)
    barrier.wait(120)
    try:
        if action == "promote":
            outcome = registry.promote(engine, version, actor=f"worker-{version}", reason="concurrent")
        else:
            outcome = registry.rollback(engine, actor="rollback-worker", reason="concurrent")
        results.put((action, version, "ok", outcome.version))
    except registry.RegistryError as error:
        results.put((action, version, "refused", str(error)))
    finally:
        engine.dispose()


def test_concurrent_promotions_and_rollbacks_leave_one_production_version(engine, db_url):
    versions = [f"ft-{i}" for i in range(6)]
    for version in versions:
        _register(engine, version)
    context = multiprocessing.get_context("spawn")
    jobs = [("promote", version) for version in versions] + [("rollback", None)] * 2
    barrier = context.Barrier(len(jobs))
    results = context.Queue()
    workers = [
        context.Process(target=_registry_worker, args=(db_url, action, version, barrier, results))
        for action, version in jobs
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    # A worker that crashed reports nothing: the exit codes say so before the queue is read.
    assert [worker.exitcode for worker in workers] == [0] * len(workers)
    outcomes = [results.get(timeout=10) for _ in workers]

    assert sorted(o[1] for o in outcomes if o[0] == "promote" and o[2] == "ok") == versions
    for action, _, status, detail in outcomes:
        if action == "rollback" and status == "refused":
            assert "no model version is in production" in detail or "no previous version" in detail
    with engine.connect() as connection:
        stages = dict(connection.execute(sa.text("SELECT version, stage FROM model_versions")).all())
    assert list(stages.values()).count("production") == 1

    # Replaying the log in order: every step starts where the last one left off, never two production
    # versions at once, and it ends in the table's state.
    replayed: dict[str, str | None] = {}
    for entry in registry.audit_log(engine):
        assert entry["from_stage"] == replayed.get(entry["version"])
        replayed[entry["version"]] = entry["to_stage"]
        assert list(replayed.values()).count("production") <= 1
    assert replayed == stages
    promotions = [e["version"] for e in registry.audit_log(engine) if e["to_stage"] == "production"]
    rollbacks = sum(1 for o in outcomes if o[0] == "rollback" and o[2] == "ok")
    assert len(promotions) == len(versions) + rollbacks
    assert set(versions) <= set(promotions)


def test_models_commands(engine, db_url, monkeypatch, capsys):
    monkeypatch.setenv("LLMOPS_DATABASE_URL", db_url)
    monkeypatch.setenv("USER", "bob")
    _register(engine, "ft-1")
    _register(engine, "ft-2")

    assert cli.main(["models", "approve", "ft-1", "--by", "alice"]) == 0
    assert cli.main(["models", "approve", "ft-2"]) == 0
    assert registry.get(engine, "ft-2").approver == "bob"
    assert registry.get(engine, "ft-2").reason == "approved by hand"
    capsys.readouterr()

    assert cli.main(["models", "list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed[0].split()[:2] == ["ft-2", "production"]
    assert listed[1].split()[:2] == ["ft-1", "archived"]

    assert cli.main(["models", "rollback", "--reason", "latency regression"]) == 0
    assert registry.production(engine).version == "ft-1"
    assert cli.main(["models", "show", "ft-1"]) == 0
    shown = capsys.readouterr().out
    assert "archived -> production  by bob: rollback from 'ft-2': latency regression" in shown

    assert cli.main(["models", "reject", "ft-1", "--reason", "bad"]) == 2
    assert "roll back instead" in capsys.readouterr().err
    assert cli.main(["models", "approve", "ft-404"]) == 2
    captured = capsys.readouterr()
    assert "model version 'ft-404' is not in the registry" in captured.err
    assert captured.out == ""

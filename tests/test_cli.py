"""The `llmops` command refuses bad arguments with a message naming them, never a traceback.

Touches: argument parsing only, except the trace lookup, which reads a database of its own."""

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from llmops_dagster import cli

LLMOPS = str(Path(sys.executable).parent / "llmops")


@pytest.mark.parametrize(("argv", "message"), [
    (["quarantine", "-n", "-1"], "argument -n: must be at least 1, got -1"),
    (["quarantine", "-n", "x"], "argument -n: 'x' is not a whole number"),
    (["trace", "not-a-uuid"], "argument response_id: must be a response id (a UUID)"),
    (["trace", str(uuid.uuid4()), "--rows", "0"], "argument --rows: must be at least 1"),
])
def test_bad_arguments_name_the_argument(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_undecodable_bytes_in_an_argument_are_refused_without_a_traceback(tmp_path):
    """A terminal passes bytes that are not UTF-8 as lone surrogates; they never reach SQL."""
    for argv in ([b"models", b"show", b"ft-\xff"], [b"trace", b"\xfe\xff"]):
        result = subprocess.run([LLMOPS.encode(), *argv], capture_output=True, timeout=120,
                                env={**os.environ, "LLMOPS_HOME": str(tmp_path)})
        assert result.returncode == 2, result.stderr
        assert b"Traceback" not in result.stderr
        assert b"is not valid UTF-8 text" in result.stderr or b"must be a response id" in result.stderr


@pytest.mark.parametrize(("argv", "message"), [
    (["run", "--job", "nope"], "--job 'nope' is not a job; one of ['deploy', 'main', 'retrain', 'rollback']"),
    (["run", "--config", "{bad"], "--config is not JSON: Expecting property name"),
    (["run", "--config", "[1]"], "--config must be a JSON object"),
])
def test_run_refuses_an_unknown_job_or_bad_config_before_starting(argv, message, capsys):
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_trace_finds_a_response_by_its_id_in_any_case(fresh_database, capsys):
    engine = fresh_database.engine()
    response_id = str(uuid.uuid4())
    with engine.begin() as connection:
        connection.execute(sa.text(
            "INSERT INTO request_log (response_id, model_version, prompt, response, max_new_tokens, "
            "latency_ms) VALUES (:id, 'v-missing', 'q', 'a', 8, 1.0)"), {"id": response_id})
    assert cli.main(["trace", response_id.upper()]) == 2
    # Found (the chain stops at the model, which this database does not have), not "not found".
    assert "model version 'v-missing' in the registry not found" in capsys.readouterr().err


def test_status_shows_registry_served_version_and_runs_side_by_side(fresh_database, dagster_database,
                                                                     tmp_path, monkeypatch, capsys):
    """A production version that nothing serves (no Ray Serve on a free port): status says they
    disagree and exits 1; a queued rollback run is listed."""
    import dagster as dg

    from llmops_dagster.definitions import defs
    from llmops_dagster.governance import registry

    engine = fresh_database.engine()
    with engine.begin() as connection:
        connection.execute(sa.text(
            "INSERT INTO dataset_versions (version, input_hash, source, path, rows_input, rows_accepted, "
            "rows_quarantined) VALUES ('d1', 'h', 'synthetic', '/nowhere', 1, 1, 0)"))
    registry.register_candidate(engine, version="v1", dataset_version="d1", prompt_set_version="p1",
                                base_model_version="b1", checkpoint_path="-", adapter_path="-",
                                merged_model_path="-", train_config={}, eval_report_id=None)
    registry.promote(engine, "v1", actor="policy", reason="passed")
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    cli._prepare_instance_env()
    with dg.DagsterInstance.get() as instance:
        instance.create_run_for_job(job_def=defs.resolve_job_def("rollback"),
                                    tags={"llmops/trigger": "rollback_guard"})
    monkeypatch.setattr("resources.serving.RayServeResource.url", lambda self: "http://127.0.0.1:9")
    assert cli.main(["status"]) == 1
    out = capsys.readouterr().out
    assert "registry      v1 in production" in out and "served        nothing answers" in out
    assert "rollback NOT_STARTED (trigger rollback_guard)" in out and "agreement     NO" in out


def test_database_urls_are_printed_without_their_password(fresh_database, dagster_database, tmp_path,
                                                         monkeypatch, capsys):
    """Every command, with the real password in each URL (as a server of your own would be
    configured): the password is in no line it prints, on stdout or stderr."""
    from llmops_dagster import database, embedded_auth
    from llmops_dagster.database_roles import APP, OWNER

    assert database.redacted("postgresql://app:S3cretPW@db.example:5432/llmops") == \
        "postgresql://app:***@db.example:5432/llmops"
    assert database.redacted("postgresql://app@db/llmops") == "postgresql://app@db/llmops"
    data_dir = fresh_database._data_dir().resolve()

    def with_password(variable: str, role: str) -> str:
        url = sa.engine.make_url(os.environ[variable])
        password = embedded_auth.password(data_dir, role)
        monkeypatch.setenv(variable, url.set(password=password, query={"host": url.query["host"]})
                           .render_as_string(hide_password=False))
        return password

    passwords = [with_password("LLMOPS_DATABASE_URL", APP), with_password("LLMOPS_DATABASE_OWNER_URL", OWNER),
                 with_password("LLMOPS_DAGSTER_DATABASE_URL", APP)]
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    monkeypatch.setattr("resources.serving.RayServeResource.url", lambda self: "http://127.0.0.1:9")
    commands = [["env"], ["db", "url"], ["db", "start"], ["status"], ["quarantine"], ["models", "list"],
                ["models", "show", "nope"], ["trace", str(uuid.uuid4())], ["keys", "list"],
                ["keys", "create", "k1", "--role", "rater"], ["feedback", "review", "--accept", "1"],
                ["feedback", "purge", "--id", "1", "--reason", "test"], ["run", "--job", "nope"]]
    for argv in commands:
        try:
            cli.main(argv)
        except SystemExit:
            pass
        out, err = capsys.readouterr()
        leaked = [p for p in passwords if p in out or p in err]
        assert not leaked, (argv, out[-500:], err[-500:])


@pytest.mark.parametrize(("variable", "value"), [("LLMOPS_RAY_PORT", "abc"),
                                                 ("LLMOPS_SERVE_HTTP_PORT", "70000")])
def test_a_bad_port_setting_is_named_in_one_line(variable, value, monkeypatch, capsys):
    monkeypatch.setenv(variable, value)
    assert cli.main(["serve", "status"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"llmops serve: {variable} must be a TCP port (1-65535), got {value!r}"

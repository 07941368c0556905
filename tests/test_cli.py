"""The `llmops` command refuses bad arguments with one line naming them (exit status 2), and an
unexpected error with one line and the log file holding its traceback (1), never a traceback.

Touches: argument parsing; a database of its own for the trace lookup, the status, a password the
server refuses, a privilege it lacks and key names; the job's run config schema (no run starts)."""

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
    # The reproduction: a command line in run config names its deployment setting.
    (["run", "--config", '{"resources": {"trainer": {"config": {"node_start_command": '
                         '["sh", "-c", "id > proof.txt; exit 3", "--"]}}}}'],
     "trainer.node_start_command is a deployment setting, not run config: set "
     "LLMOPS_TRAINER_NODE_START_COMMAND"),
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


def test_trace_lists_each_correction_behind_the_model_with_its_text(fresh_database):
    """A correction in the training rows is shown by its question and corrected answer (the text
    the training row holds), beside who sent and accepted it; a purged one says so."""
    from llmops_dagster.feedback import review
    from llmops_dagster.governance.trace import corrections_behind

    engine = fresh_database.engine()
    response_id = str(uuid.uuid4())
    with engine.begin() as connection:
        connection.execute(sa.text(
            "INSERT INTO request_log (response_id, model_version, prompt, response, max_new_tokens, "
            "latency_ms) VALUES (:id, 'v1', 'Where is order A1?', 'wrong', 8, 1.0)"), {"id": response_id})
        feedback_id = connection.execute(sa.text(
            "INSERT INTO feedback (response_id, client_id, rating, correction, rater, credential, counted, "
            "review_state) VALUES (:id, 'c', -1, 'It ships today.', 'r1', 'feedback_token', true, "
            "'pending') RETURNING id"), {"id": response_id}).scalar_one()
    review.decide(engine, feedback_id, "accept", "ana", "right")
    texts = {feedback_id: {"question": "Where is order A1?", "corrected_answer": "It ships today."},
             feedback_id + 1: {"question": "gone?", "corrected_answer": "purged since"}}
    accepted, purged = corrections_behind(engine, texts)
    assert accepted["question"] == "Where is order A1?" and accepted["corrected_answer"] == "It ships today."
    assert (accepted["response_id"], accepted["review_state"], accepted["reviewed_by"]) == (
        response_id, "accepted", "ana")
    assert purged["review_state"] == "purged" and purged["corrected_answer"] == "purged since"


def test_status_shows_registry_served_version_and_runs_side_by_side(fresh_database, dagster_database,
                                                                     tmp_path, monkeypatch, capsys):
    """A production version that nothing serves (no Ray Serve on a free port): status says they
    disagree and exits 1; a queued rollback run is listed, and the ratings and reviews beside them."""
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
    with engine.begin() as connection:  # 3 ratings of v1's answers, 2 counted; 1 correction pending
        for rating, counted, review in ((1, True, None), (-1, True, "pending"), (-1, False, None)):
            response_id = str(uuid.uuid4())
            connection.execute(sa.text(
                "INSERT INTO request_log (response_id, model_version, prompt, response, max_new_tokens, "
                "latency_ms) VALUES (:id, 'v1', 'q', 'a', 8, 1.0)"), {"id": response_id})
            connection.execute(sa.text(
                "INSERT INTO feedback (response_id, client_id, rating, correction, rater, credential, "
                "counted, actor, review_state) VALUES (:id, 'c', :rating, :correction, :rater, "
                "'feedback_token', :counted, :rater, :review)"),
                {"id": response_id, "rating": rating, "counted": counted, "review": review,
                 "correction": "better" if review else None, "rater": f"token:{response_id}"})
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
    assert ("ratings       3 stored, 2 counted (sent with a credential); 2 counted on v1 since its "
            "promotion (1 negative, from 2 raters, at most 3 each)") in out, out
    assert "reviews       1 corrections waiting for review (llmops feedback review); 0 accepted" in out


def test_commands_answer_without_a_warning_before_it(llmops_home, dagster_database, tmp_path):
    """What the embedded server's library (pgserver: XDG_RUNTIME_DIR unset, as in a container or
    cron) and the definitions (a beta Dagster API) used to warn about comes before no answer."""
    from llmops_dagster.training.launch import free_port

    env = {name: value for name, value in os.environ.items()
           if name not in ("XDG_RUNTIME_DIR", "PYTHONWARNINGS", "LLMOPS_DATABASE_URL")}
    env.update(LLMOPS_HOME=str(llmops_home), DAGSTER_HOME=str(tmp_path / "dagster_home"),
               LLMOPS_SERVE_HTTP_PORT=str(free_port()))
    for argv in (["--help"], ["models", "list"], ["status"]):  # status loads the definitions
        result = subprocess.run([LLMOPS, *argv], env=env, capture_output=True, text=True, timeout=300)
        assert result.stdout and result.stderr == "", (argv, result.stderr[-2000:])


def test_database_urls_are_printed_without_their_password(fresh_database, dagster_database, tmp_path,
                                                         monkeypatch, capsys):
    """Every command, with the real password in each URL (as a server of your own would be
    configured): the password is in no line it prints, on stdout or stderr."""
    from llmops_dagster.infra import database, embedded_auth
    from llmops_dagster.infra.database_roles import APP, OWNER

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


@pytest.mark.parametrize(("argv", "message"), [
    (["quarantine", "-n", "99999999999999999999"], "argument -n: must be at most 10000"),
    (["models", "rollback", "--reason", ""], "argument --reason: must say why"),
    (["models", "rollback", "--reason", "  \t"], "argument --reason: must say why"),
    (["models", "reject", "v1", "--reason", "ok\n\x1b[2Jforged line"], "argument --reason: holds a control"),
    (["models", "approve", "v1", "--reason", " "], "argument --reason: must say why"),
    (["feedback", "purge", "--id", "1", "--reason", ""], "argument --reason: must say why"),
    (["feedback", "purge-answers", "--until", "2020-01-01", "--reason", " "], "--reason: must say why"),
    (["feedback", "review", "--accept", "1", "--note", ""], "argument --note: must say why"),
    (["feedback", "purge", "--id", "99999999999999999999", "--reason", "x"], "--id: must be at most"),
    (["keys", "create", "bad\nname", "--role", "client"], "argument name: 'bad\\nname' is not a key name"),
    (["keys", "create", "\x1b[31mred", "--role", "client"], "is not a key name"),
    (["keys", "create", "ok", "--role", "client", "--by", "\x1b]0;x\x07"], "argument --by:"),
    (["trace", str(uuid.uuid4()), "--html", "/nonexistent/dir/t.html"], "its folder does not exist"),
    (["trace", str(uuid.uuid4()), "--html", "/tmp"], "argument --html: '/tmp' is a folder"),
    (["trace", str(uuid.uuid4()), "--ui-url", "javascript:alert(1)"], "is not an http:// or https://"),
    (["ui", "--port", "-5"], "argument --port: must be at least 1, got -5"),
    (["serve", "stop", "--port", "0"], "argument --port: must be at least 1"),
    (["models"], "the following arguments are required: models_command"),
])
def test_every_bad_argument_is_one_line_naming_it(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert message in err and err.count("\n") == 1 and err.startswith("llmops "), err


def test_run_config_that_does_not_fit_the_job_is_one_line_naming_the_entry(capsys):
    assert cli.main(["run", "--config", '{"ops": {"nope": {}}}']) == 2
    err = capsys.readouterr().err
    assert err.startswith("llmops run: --config does not fit job main:") and "nope" in err, err
    assert err.count("\n") == 1, err
    assert cli.main(["run", "--config", "[" * 100_000]) == 2  # nested too deep for the decoder
    assert "--config is not JSON" in capsys.readouterr().err


def test_a_refused_database_password_is_one_line_naming_the_setting(fresh_database, monkeypatch, capsys):
    url = sa.engine.make_url(os.environ["LLMOPS_DATABASE_URL"])
    wrong = url.set(password="WrongPW4711", query={"host": url.query["host"]})
    monkeypatch.setenv("LLMOPS_DATABASE_URL", wrong.render_as_string(hide_password=False))
    assert cli.main(["db", "url"]) == 2  # the owner's URL works: `db url` tries the application role's
    assert "password authentication failed" in capsys.readouterr().err
    monkeypatch.delenv("LLMOPS_DATABASE_OWNER_URL")  # a managed server with one role, as reported
    for argv in (["db", "url"], ["env"], ["models", "list"], ["status"], ["quarantine"]):
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(f"llmops {argv[0]}: the database cannot be used ("), err
        assert err.count("\n") == 1, err
        assert "password authentication failed" in err and "LLMOPS_DATABASE_URL=postgresql" in err, err
        assert "WrongPW4711" not in err and ":***@" in err, err


def test_an_unexpected_error_is_one_line_with_the_log_holding_its_traceback(fresh_database, monkeypatch,
                                                                             capsys):
    """A database whose application role lost its privilege on a table (a real server state, not an
    argument): exit status 1, one line, the traceback in a 0600 file under $LLMOPS_HOME/logs/."""
    from llmops_dagster.infra.settings import llmops_home

    owner = sa.create_engine(os.environ["LLMOPS_DATABASE_OWNER_URL"])
    with owner.begin() as connection:
        connection.execute(sa.text("REVOKE SELECT ON quarantine_rows FROM PUBLIC"))
        connection.execute(sa.text("REVOKE ALL ON quarantine_rows FROM llmops_app"))
    owner.dispose()
    assert cli.main(["quarantine"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("llmops quarantine: unexpected error ") and err.count("\n") == 1, err
    log = Path(err.rsplit("traceback in ", 1)[1].strip())
    assert log.parent == llmops_home() / "logs" and (log.stat().st_mode & 0o777) == 0o600
    assert "Traceback (most recent call last)" in log.read_text() and "Traceback" not in err


def test_create_key_refuses_names_outside_its_alphabet(fresh_database):
    from llmops_dagster.serving import credentials

    engine = fresh_database.engine()
    for name in ("", "a b", "line\nbreak", "esc\x1b[0m", "é", "x" * 65, "quote'"):
        with pytest.raises(credentials.CredentialError, match="letters, digits"):
            credentials.create_key(engine, name, "client", created_by="test")
    key, _ = credentials.create_key(engine, "ci-runner_2.prod", "client", created_by="test")
    assert key.name == "ci-runner_2.prod"

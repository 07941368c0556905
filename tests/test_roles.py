"""Least privilege in PostgreSQL: the Serve replicas' role and the application role are refused
everything they should not do, each statement tried on its own; the embedded server asks every
connection for a password.

Touches: a database of each test's own on the session's server (fresh_database), one database
made as an older install made it (test_an_older_database_is_handed_to_the_owner_role).
"""

import os
import stat
import uuid

import pytest
import sqlalchemy as sa

from llmops_dagster.infra import database, database_roles, embedded_auth

# What the replicas (the one public-facing process) must never do, whatever is injected into them.
SERVING_REFUSED = [
    "DELETE FROM request_log",
    "DELETE FROM feedback",
    "UPDATE request_log SET response = 'rewritten'",
    "UPDATE feedback SET rating = 1",
    "UPDATE feedback SET counted = true",
    "TRUNCATE request_log",
    "TRUNCATE feedback",
    "ALTER TABLE feedback ADD COLUMN smuggled text",
    "ALTER TABLE feedback_audit_log DISABLE TRIGGER USER",
    "DROP TABLE request_log",
    "CREATE TABLE smuggled (x int)",
    "SELECT * FROM model_versions",
    "SELECT * FROM curated_feedback",
    "SELECT * FROM quarantine_rows",
    "INSERT INTO model_audit_log (version, to_stage, actor, reason) VALUES ('v1', 'archived', 'x', 'y')",
    "INSERT INTO api_keys (name, role, key_hash, key_prefix, created_by) "
    "VALUES ('mine', 'reviewer', 'h', 'p', 'me')",
    "UPDATE api_keys SET revoked_at = NULL",
    "DELETE FROM api_keys",
    "INSERT INTO signing_keys (name, secret) VALUES ('mine', '\\x00')",
    "DELETE FROM feedback_audit_log",
    "SELECT * FROM feedback_audit_log",
    "ALTER ROLE llmops_serving SUPERUSER",
    "CREATE SCHEMA smuggled",
    # A review decision goes through review_decide_as_key, which checks the key.
    "UPDATE feedback SET review_state = 'accepted'",
    "UPDATE feedback SET reviewed_by = 'key:reviewer-1', review_note = 'forged'",
    "SELECT review_decide_as_person(1, 'accepted', 'mallory', 'no key needed?')",
    "SELECT review_record_decision(1, 'accepted', 'key:reviewer-1', 'the inner function')",
    "SELECT registry_move('v1', 'production', 'archived', 'mallory', 'x', true)",
]

# What the platform's own role must never do: empty or rewrite an audit log, or change a table.
APP_REFUSED = [
    "DELETE FROM model_audit_log",
    "DELETE FROM feedback_audit_log",
    "UPDATE model_audit_log SET reason = 'rewritten'",
    "UPDATE feedback_audit_log SET reason = 'rewritten'",
    "TRUNCATE model_audit_log",
    "TRUNCATE feedback_audit_log",
    "TRUNCATE request_log",
    "ALTER TABLE model_audit_log DISABLE TRIGGER USER",
    "ALTER TABLE feedback_audit_log DISABLE TRIGGER ALL",
    "ALTER TABLE model_versions ADD COLUMN smuggled text",
    "DROP TABLE model_audit_log",
    "DROP FUNCTION model_audit_log_append_only() CASCADE",
    "CREATE TABLE smuggled (x int)",
    "UPDATE alembic_version SET version_num = '0001'",
    "ALTER ROLE llmops_app SUPERUSER",
    "CREATE SCHEMA smuggled",
    # A stage changes, and an audit row appears, only through the registry's functions.
    "UPDATE model_versions SET stage = 'archived'",
    "UPDATE model_versions SET approver = 'mallory', reason = 'forged'",
    "UPDATE model_versions SET merged_model_path = '/somewhere/else'",
    "UPDATE model_versions SET purged_feedback = '{}'",
    "INSERT INTO model_versions (version, stage, dataset_version, prompt_set_version, "
    "base_model_version, checkpoint_path, adapter_path, merged_model_path, train_config) "
    "VALUES ('v2', 'production', 'd', 'p', 'b', '-', '-', '-', '{}')",
    "DELETE FROM model_versions",
    "INSERT INTO model_audit_log (version, from_stage, to_stage, actor, reason) "
    "VALUES ('v1', 'candidate', 'production', 'mallory', 'made up')",
    "DELETE FROM artifact_redactions",
    # A review decision goes through review_decide_as_person, which writes its audit row.
    "UPDATE feedback SET review_state = 'accepted'",
    "SELECT review_record_decision(1, 'accepted', 'mallory', 'the inner function')",
    "SELECT review_decide_as_key(1, 'accepted', 'reviewer-1', 'not the platform''s function')",
]


def _refused(url: str, statement: str) -> str:
    """The error PostgreSQL gives for `statement` as the role of `url`; fails when it succeeds."""
    engine = sa.create_engine(url)
    try:
        with engine.begin() as connection:
            connection.execute(sa.text(statement))
    except sa.exc.DBAPIError as error:
        return str(error.orig).splitlines()[0]
    finally:
        engine.dispose()
    pytest.fail(f"{statement!r} succeeded as {sa.engine.make_url(url).username}")


@pytest.fixture
def audited(fresh_database):
    """A database with a row in each audit log (so that emptying one would show)."""
    from llmops_dagster.governance import registry

    engine = fresh_database.engine()
    registry.register_candidate(engine, version="v1", dataset_version="d1", prompt_set_version="p1",
                                base_model_version="b1", checkpoint_path="-", adapter_path="-",
                                merged_model_path="-", train_config={}, eval_report_id=None)
    registry.promote(engine, "v1", actor="policy", reason="passed")
    with engine.begin() as connection:
        connection.execute(sa.text("INSERT INTO feedback_audit_log (feedback_id, action, actor, reason) "
                                   "VALUES (1, 'purged', 'test', 'a row to protect')"))
    return fresh_database


@pytest.mark.parametrize("statement", SERVING_REFUSED)
def test_the_serving_role_is_refused(audited, statement):
    error = _refused(audited.serving_url(), statement)
    assert "permission denied" in error or "must be owner" in error, error


@pytest.mark.parametrize("statement", APP_REFUSED)
def test_the_application_role_is_refused(audited, statement):
    error = _refused(audited.url(), statement)
    assert "permission denied" in error or "must be owner" in error, error
    with audited.engine().connect() as connection:
        assert connection.execute(sa.text("SELECT count(*) FROM model_audit_log")).scalar() >= 1
        assert connection.execute(sa.text("SELECT count(*) FROM feedback_audit_log")).scalar() == 1


def test_the_serving_role_does_what_serving_needs(fresh_database):
    """The replicas' whole job, as their role: log an answer, store and review a rating, read keys."""
    from llmops_dagster.feedback import review
    from llmops_dagster.serving import credentials, traffic_log

    _, key = credentials.create_key(fresh_database.engine(), "rater-1", "rater", created_by="test")
    credentials.create_key(fresh_database.engine(), "reviewer-1", "reviewer", created_by="test")
    credentials.signing_secret(fresh_database.engine())
    serving = sa.create_engine(fresh_database.serving_url())
    try:
        assert len(credentials.read_signing_secret(serving)) == 32
        rater = credentials.authenticate(serving, key)
        assert rater is not None and rater.name == "rater-1"
        response_id = str(uuid.uuid4())
        traffic_log.log_requests(serving, [{
            "id": response_id, "version": "v1", "prompt": "where is my order?",
            "response": "it ships today", "max_new_tokens": 8, "latency": 5.0, "api_key_id": None}])
        served, receiver, _ = traffic_log.answer_receiver(serving, response_id)
        assert served and receiver is None
        stored = traffic_log.store_feedback(serving, traffic_log.Rating(
            response_id=response_id, rating=-1, correction="it shipped yesterday", comment=None,
            client_id="c", credential=credentials.judge_rating(rater, response_id, receiver, None),
            review=review.initial_review(-1, "it shipped yesterday", None), source_address="127.0.0.1"))
        assert stored["counted"] is True, stored
        assert review.pending(serving)["feedback_id"].tolist() == [stored["feedback_id"]]
        decision = review.decide(serving, stored["feedback_id"], "accept", actor="key:reviewer-1")
        assert decision.state == "accepted"
    finally:
        serving.dispose()


def test_the_embedded_server_asks_every_connection_for_a_password(platform_db):
    data_dir = platform_db._data_dir().resolve()
    hba = (data_dir / "pg_hba.conf").read_text()
    rules = [line.split() for line in hba.splitlines() if line.strip() and not line.startswith("#")]
    assert rules and all(rule[-1] == "scram-sha-256" for rule in rules), hba
    # The socket and the superuser's name are no longer enough: without the password file, refused.
    superuser = sa.engine.make_url(platform_db.admin_url())
    bare = superuser.set(query={"host": superuser.query["host"]})
    engine = sa.create_engine(bare)
    with pytest.raises(sa.exc.OperationalError, match="password"):
        engine.connect()
    engine.dispose()
    secrets = embedded_auth.secrets_dir(data_dir)
    assert stat.S_IMODE(secrets.stat().st_mode) == 0o700
    for role in (embedded_auth.SUPERUSER, *database_roles.ROLES):
        passfile = embedded_auth.passfile(data_dir, role)
        assert stat.S_IMODE(passfile.stat().st_mode) == 0o600
        assert passfile.read_text().split(":")[3] == role
        assert embedded_auth.password(data_dir, role) not in platform_db.admin_url()
    assert "passfile=" in platform_db.url() and "@/" in platform_db.url()  # role@, no :password@


def test_an_older_database_is_handed_to_the_owner_role(platform_db):
    """A platform database that an older embedded server made (every table the superuser's) is
    handed to the owner role, and the application role can then work in it."""
    name = f"older_{uuid.uuid4().hex[:10]}"
    superuser = database.ensure_database(platform_db.admin_url(), name)
    database.migrate(superuser)  # as the superuser, as before roles
    database.ensure_database(platform_db.admin_url(), name, owner=database_roles.OWNER)
    owner_url = database.embedded_server_url(platform_db._data_dir(), database_roles.OWNER, name)
    app_url = database.embedded_server_url(platform_db._data_dir(), database_roles.APP, name)
    app = database.platform_engine(app_url, owner_url)
    try:
        with app.connect() as connection:
            owners = set(connection.execute(sa.text(
                "SELECT tableowner FROM pg_tables WHERE schemaname = 'public'")).scalars())
            assert owners == {database_roles.OWNER}
            assert connection.execute(sa.text("SELECT count(*) FROM model_versions")).scalar() == 0
    finally:
        app.dispose()
    assert "must be owner" in _refused(app_url, "ALTER TABLE model_audit_log DISABLE TRIGGER USER")


def test_no_password_reaches_the_environment_dagster_gets(platform_db, tmp_path, monkeypatch):
    from llmops_dagster.infra.instance import prepare_dagster_home

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    monkeypatch.delenv("LLMOPS_DAGSTER_DATABASE_URL", raising=False)
    environment = prepare_dagster_home(platform_db)
    url = sa.engine.make_url(environment["LLMOPS_DAGSTER_DATABASE_URL"])
    assert url.password is None and url.username == database_roles.APP
    passwords = [embedded_auth.password(platform_db._data_dir().resolve(), role)
                 for role in database_roles.ROLES]
    assert not [p for p in passwords if p in repr(environment) or p in repr(dict(os.environ))]


@pytest.mark.parametrize("role", [database_roles.APP, database_roles.SERVING])
def test_neither_role_can_create_a_database(platform_db, role):
    url = database.embedded_server_url(platform_db._data_dir(), role, "postgres")
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection, pytest.raises(sa.exc.ProgrammingError,
                                                           match="permission denied"):
            connection.execute(sa.text("CREATE DATABASE smuggled"))
    finally:
        engine.dispose()


def test_the_application_role_alone_cannot_migrate_and_says_what_to_set(platform_db, monkeypatch):
    """A server of your own configured with the application role only, on a database nobody has
    migrated yet: one clear error naming the setting, not a raw permission error."""
    from resources.database import PostgresResource

    name = f"unmigrated_{uuid.uuid4().hex[:10]}"
    database.ensure_database(platform_db.admin_url(), name, owner=database_roles.OWNER,
                             extensions=("vector",))
    monkeypatch.setenv("LLMOPS_DATABASE_URL",
                       database.embedded_server_url(platform_db._data_dir(), database_roles.APP, name))
    monkeypatch.delenv("LLMOPS_DATABASE_OWNER_URL", raising=False)
    with pytest.raises(database.DatabaseConfigError, match="set LLMOPS_DATABASE_OWNER_URL"):
        PostgresResource().engine()


def _stored_rating(serving: sa.Engine, key: str | None = None) -> dict:
    """A down-vote with a correction, stored by the replicas' role as the app stores it, sent with
    `key` (a reviewer's is accepted on arrival)."""
    from llmops_dagster.feedback import review
    from llmops_dagster.serving import credentials, traffic_log

    response_id = str(uuid.uuid4())
    traffic_log.log_requests(serving, [{
        "id": response_id, "version": "v1", "prompt": "where is my order?", "response": "no idea",
        "max_new_tokens": 8, "latency": 5.0, "api_key_id": None}])
    sender = credentials.authenticate(serving, key) if key else None
    trusted = sender.name if sender and sender.role in credentials.TRUSTED_CORRECTIONS else None
    return traffic_log.store_feedback(serving, traffic_log.Rating(
        response_id=response_id, rating=-1, correction="it ships today", comment=None, client_id="c",
        credential=credentials.judge_rating(sender, response_id, None, None),
        review=review.initial_review(-1, "it ships today", trusted), source_address="127.0.0.1"))


def test_only_a_live_reviewer_key_decides_a_review(fresh_database):
    """The replicas' role decides a review only for a key that is a reviewer's and not revoked,
    whatever it calls; a correction arrives accepted only from such a key."""
    from llmops_dagster.feedback import review
    from llmops_dagster.serving import credentials

    engine = fresh_database.engine()
    credentials.create_key(engine, "rater-1", "rater", created_by="test")
    credentials.create_key(engine, "former-reviewer", "reviewer", created_by="test")
    credentials.revoke_key(engine, "former-reviewer", revoked_by="test")
    _, reviewer_key = credentials.create_key(engine, "reviewer-1", "reviewer", created_by="test")
    serving = sa.create_engine(fresh_database.serving_url())
    try:
        feedback_id = _stored_rating(serving)["feedback_id"]
        for name in ("rater-1", "former-reviewer", "nobody"):
            with pytest.raises(review.ReviewError, match=f"key {name} is not a live reviewer key"):
                review.decide(serving, feedback_id, "accept", actor=f"key:{name}")
        error = _refused(fresh_database.serving_url(),
                         f"SELECT review_decide_as_key({feedback_id}, 'accepted', 'rater-1', 'direct')")
        assert "not a live reviewer key" in error, error
        assert review.pending(serving)["feedback_id"].tolist() == [feedback_id]
        assert review.audit_trail(engine, feedback_id) == []
        error = _refused(fresh_database.serving_url(),
                         "INSERT INTO feedback (response_id, client_id, rating, correction, review_state, "
                         "reviewed_by, api_key_id) SELECT response_id, 'c', -1, 'trust me', 'accepted', "
                         "'key:rater-1', (SELECT id FROM api_keys WHERE name = 'rater-1') FROM request_log")
        assert "only from a live reviewer key" in error, error

        decision = review.decide(serving, feedback_id, "accept", actor="key:reviewer-1", note="right")
        assert (decision.state, decision.reviewed_by) == ("accepted", "key:reviewer-1")
        assert [(e["action"], e["actor"]) for e in review.audit_trail(engine, feedback_id)] == [
            ("accepted", "key:reviewer-1")]
        assert _stored_rating(serving, reviewer_key)["review"] == "accepted"
    finally:
        serving.dispose()


def _stage_changes(engine: sa.Engine) -> tuple[dict[str, tuple[str, str]], list[dict]]:
    """Each version's (stage, xmin: the transaction that last wrote it) and the audit log with the
    xmin of each row."""
    with engine.connect() as connection:
        versions = {r.version: (r.stage, r.xmin) for r in connection.execute(sa.text(
            "SELECT version, stage, xmin::text AS xmin FROM model_versions"))}
        log = [dict(r) for r in connection.execute(sa.text(
            "SELECT id, version, from_stage, to_stage, xmin::text AS xmin FROM model_audit_log "
            "ORDER BY id")).mappings()]
    return versions, log


@pytest.mark.parametrize("operation", ["approve", "reject", "rollback"])
def test_each_stage_change_writes_one_audit_row_in_its_transaction(fresh_database, operation):
    """Through registry.py as the platform's role: every version whose stage changed has exactly
    one new audit row, written by the same transaction as the change (same xmin)."""
    from llmops_dagster.governance import registry

    engine = fresh_database.engine()
    for version in ("v1", "v2", "v3"):
        registry.register_candidate(engine, version=version, dataset_version="d", prompt_set_version="p",
                                    base_model_version="b", checkpoint_path="-", adapter_path="-",
                                    merged_model_path="-", train_config={}, eval_report_id=None)
    registry.promote(engine, "v1", actor="alice", reason="first")
    registry.promote(engine, "v2", actor="alice", reason="second")
    before, log_before = _stage_changes(engine)
    if operation == "approve":
        registry.promote(engine, "v3", actor="bob", reason="better")
    elif operation == "reject":
        registry.reject(engine, "v3", actor="bob", reason="worse")
    else:
        registry.rollback(engine, actor="bob", reason="complaints")
    after, log_after = _stage_changes(engine)
    changed = {v for v in after if after[v][0] != before[v][0]}
    new_rows = log_after[len(log_before):]
    expected = {"approve": {"v2", "v3"}, "reject": {"v3"}, "rollback": {"v1", "v2"}}[operation]
    assert changed == expected
    assert sorted(r["version"] for r in new_rows) == sorted(changed)
    for row in new_rows:
        assert (row["from_stage"], row["to_stage"]) == (before[row["version"]][0], after[row["version"]][0])
        assert row["xmin"] == after[row["version"]][1]
    assert len({r["xmin"] for r in new_rows}) == 1  # one transaction for the whole operation


def test_the_registry_functions_allow_only_its_transitions(audited):
    error = _refused(audited.url(), "SELECT registry_move('v1', 'rejected', 'production', 'm', 'x', true)")
    assert "is not a registry transition" in error, error


def test_the_grants_take_back_what_an_older_grant_gave(fresh_database):
    """An install whose roles were granted before the registry and review functions existed is
    corrected by the next grant_privileges, which changes nothing when run again."""
    owner = sa.create_engine(os.environ["LLMOPS_DATABASE_OWNER_URL"])
    app, serving = database_roles.APP, database_roles.SERVING
    privileges = [
        ("SELECT has_column_privilege(:app, 'model_versions', 'stage', 'UPDATE')", {"app": app}),
        ("SELECT has_table_privilege(:app, 'model_audit_log', 'INSERT')", {"app": app}),
        ("SELECT has_column_privilege(:serving, 'feedback', 'review_state', 'UPDATE')",
         {"serving": serving}),
    ]
    try:
        with owner.begin() as connection:
            connection.execute(sa.text(f"GRANT UPDATE, INSERT ON model_versions, model_audit_log TO {app}"))
            connection.execute(sa.text(f"GRANT UPDATE (review_state) ON feedback TO {serving}"))
            assert all(connection.execute(sa.text(q), p).scalar() for q, p in privileges)
            database_roles.grant_privileges(connection)
            assert not any(connection.execute(sa.text(q), p).scalar() for q, p in privileges)
            tables = connection.execute(sa.text(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")).scalars().all()
            assert not database_roles._missing_grants(connection, {app, serving}, tables)
    finally:
        owner.dispose()
    assert "permission denied" in _refused(fresh_database.url(), "UPDATE model_versions SET stage = 'x'")

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

from llmops_dagster import database, database_roles, embedded_auth

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
        served, receiver = traffic_log.answer_receiver(serving, response_id)
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
    from llmops_dagster.instance import prepare_dagster_home

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

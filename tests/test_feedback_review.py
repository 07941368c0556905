"""Credentials, the review queue, purging and the feedback quarantine budget, on the real
PostgreSQL (a database of each test's own) and through the `llmops` CLI; no served model needed.

What counts as a rating is decided by `credentials.judge_rating` (tested as a table here, and end to
end over HTTP in test_feedback_attacks.py)."""

import uuid
from datetime import UTC, datetime, timedelta

import dagster as dg
import pytest
import sqlalchemy as sa

from llmops_dagster import cli
from llmops_dagster.feedback import curation, review
from llmops_dagster.serving import credentials

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


def key(role: str, key_id: int = 1, name: str = "k") -> credentials.ApiKey:
    return credentials.ApiKey(id=key_id, name=name, role=role, key_prefix="llk_", created_by="t",
                              created_at=NOW)


@pytest.mark.parametrize(("sender", "receiver", "token_valid", "counts", "rater"), [
    (None, None, None, False, "anonymous"),  # no credential
    (None, None, False, False, "anonymous"),  # a token of another answer
    (None, None, True, True, "token:R"),  # whoever received the answer, by its token
    (None, key("client", 2, "shop"), True, True, "key:shop"),  # ... asked with a key: that key rates
    (key("client", 1, "shop"), key("client", 1, "shop"), None, True, "key:shop"),  # its own answer
    (key("client", 1, "mallory"), key("client", 2, "shop"), None, False, "key:mallory"),  # not its own
    (key("client", 1, "mallory"), None, False, False, "key:mallory"),  # a wrong token does not help
    (key("rater", 3, "ann"), None, None, True, "key:ann"),  # annotators rate any answer
    (key("reviewer", 4, "rev"), None, None, True, "key:rev"),
])
def test_what_a_rating_counts_for_comes_from_its_credential(sender, receiver, token_valid, counts, rater):
    judged = credentials.judge_rating(sender, "R", receiver, token_valid)
    assert (judged.counts, judged.rater) == (counts, rater)
    assert judged.reason


def test_feedback_tokens_are_bound_to_their_answer():
    secret = b"s" * 32
    token = credentials.feedback_token(secret, "ABC-1")
    assert credentials.token_matches(secret, "abc-1", token)
    assert not credentials.token_matches(secret, "abc-2", token)
    assert not credentials.token_matches(b"t" * 32, "abc-1", token)


def test_keys_are_stored_hashed_shown_once_and_revocable(fresh_database, capsys):
    engine = fresh_database.engine()
    assert cli.main(["keys", "create", "shop", "--role", "client", "--by", "ops"]) == 0
    printed = capsys.readouterr()
    secret = printed.out.strip()
    assert secret.startswith("llk_") and "shown this once" in printed.err
    with engine.connect() as connection:
        stored = connection.execute(sa.text("SELECT key_hash, key_prefix FROM api_keys")).one()
    assert secret not in stored.key_hash and stored.key_hash == credentials.hash_key(secret)
    assert credentials.authenticate(engine, secret).name == "shop"
    assert credentials.authenticate(engine, secret + "x") is None

    assert cli.main(["keys", "list"]) == 0
    listing = capsys.readouterr().out
    assert "shop" in listing and secret not in listing and stored.key_prefix in listing
    assert cli.main(["keys", "create", "shop", "--role", "client"]) == 2
    assert "exists already" in capsys.readouterr().err
    assert cli.main(["keys", "revoke", "shop"]) == 0
    assert credentials.authenticate(engine, secret) is None
    assert cli.main(["keys", "revoke", "shop"]) == 2 and "was revoked" in capsys.readouterr().err


def rate(engine, prompt: str = "Where is my order A1?", rating: int = -1,
         correction: str | None = "Order A1 ships today.", key_id: int | None = None,
         review_state: str | None = "pending", created_at: datetime | None = None) -> int:
    """A served answer and its rating as the serving app stores them; returns the feedback id."""
    response_id = str(uuid.uuid4())
    with engine.begin() as connection:
        connection.execute(sa.text(
            "INSERT INTO request_log (response_id, model_version, prompt, response, max_new_tokens, "
            "latency_ms) VALUES (:id, 'v1', :prompt, 'answer', 8, 1.0)"),
            {"id": response_id, "prompt": prompt})
        return connection.execute(sa.text(
            "INSERT INTO feedback (response_id, client_id, rating, correction, rater, credential, "
            "api_key_id, counted, review_state, created_at) VALUES (:id, 'c', :rating, :correction, "
            ":rater, 'feedback_token', :key, true, :review, coalesce(:at, clock_timestamp())) RETURNING id"),
            {"id": response_id, "rating": rating, "correction": correction, "key": key_id,
             "rater": f"token:{response_id}", "review": review_state, "at": created_at}).scalar_one()


def curate(engine) -> None:
    from llmops_dagster.serving import traffic_log

    rows = traffic_log.uncurated_feedback(engine, limit=10_000)
    curation.store_curated(engine, rows, [[0.0] * 384 for _ in range(len(rows))])


def test_only_reviewed_corrections_become_training_examples(fresh_database, capsys, monkeypatch):
    engine = fresh_database.engine()
    accepted, rejected, waiting = (rate(engine) for _ in range(3))
    upvote = rate(engine, rating=1, review_state=None)  # contradicts its rating: never training data
    curate(engine)
    assert curation.correction_examples(engine).empty

    monkeypatch.setenv("USER", "ops-person")
    assert cli.main(["feedback", "review", "--accept", str(accepted), "--note", "checked the order"]) == 0
    assert cli.main(["feedback", "review", "--reject", str(rejected), "--by", "bob"]) == 0
    assert cli.main(["feedback", "review", "--accept", str(rejected)]) == 2
    assert "not pending review (state: rejected)" in capsys.readouterr().err
    assert cli.main(["feedback", "review", "--accept", str(upvote)]) == 2
    assert curation.correction_examples(engine)["feedback_id"].tolist() == [accepted]
    assert curation.review_counts(engine) == {"pending": 1, "accepted": 1, "rejected": 1}
    [entry] = review.audit_trail(engine, accepted)
    assert (entry["action"], entry["actor"]) == ("accepted", "ops-person")
    assert entry["reason"] == "checked the order"
    assert review.audit_trail(engine, rejected)[0]["actor"] == "bob"
    assert review.pending(engine)["feedback_id"].tolist() == [waiting]

    # Interactive review: skip, then reject; the queue is read in order.
    answers = iter(["s", "r"])
    monkeypatch.setattr("builtins.input", lambda prompt: next(answers))
    more = rate(engine)
    assert cli.main(["feedback", "review"]) == 0
    assert review.pending(engine)["feedback_id"].tolist() == [waiting]
    assert review.audit_trail(engine, more)[0]["action"] == "rejected"


def test_the_cap_keeps_the_newest_accepted_corrections(fresh_database):
    engine = fresh_database.engine()
    ids = [rate(engine) for _ in range(5)]
    for feedback_id in ids:
        review.decide(engine, feedback_id, "accept", actor="rev")
    curate(engine)
    assert curation.correction_examples(engine, max_rows=3)["feedback_id"].tolist() == ids[2:]


def test_purge_by_id_key_and_time_leaves_audit_records_without_the_text(fresh_database, capsys):
    engine = fresh_database.engine()
    spammer, _ = credentials.create_key(engine, "spammer", "client", created_by="t")
    by_id = rate(engine, correction="mail me at a@b.example")
    by_key = [rate(engine, key_id=spammer.id) for _ in range(3)]
    old = rate(engine, created_at=NOW - timedelta(days=400))
    kept = rate(engine)
    curate(engine)

    assert cli.main(["feedback", "purge", "--id", str(by_id), "--reason", "personal data"]) == 0
    assert cli.main(["feedback", "purge", "--key", "spammer", "--reason", "spam"]) == 0
    assert "purged 3 feedback rows" in capsys.readouterr().out
    assert cli.main(["feedback", "purge", "--reason", "no filter"]) == 2
    assert review.expire(engine, retention_days=365, now=NOW) == [old]
    assert review.expire(engine, retention_days=0) == []

    with engine.connect() as connection:
        left = connection.execute(sa.text("SELECT id FROM feedback")).scalars().all()
        curated = connection.execute(sa.text("SELECT feedback_id FROM curated_feedback")).scalars().all()
    assert left == curated == [kept]
    [record] = review.audit_trail(engine, by_id)
    assert (record["action"], record["reason"]) == ("purged", "personal data")
    assert "a@b.example" not in str(record["details"]) and record["details"]["rating"] == -1
    assert review.audit_trail(engine, old)[0]["actor"] == "retention"
    assert all(review.audit_trail(engine, i)[0]["details"]["api_key_id"] == spammer.id for i in by_key)


@pytest.fixture
def raw_and_feedback(resources):
    """A small source (raw_examples materialized) in this test's own database and instance."""
    from assets.dataset import raw_examples

    with dg.instance_for_test() as instance:
        result = dg.materialize([raw_examples], resources=resources, instance=instance,
                                run_config={"ops": {"raw_examples": {"config": {"synthetic_rows": 400}}}})
        assert result.success
        yield resources["database"].engine(), instance


def validate(resources, instance, **config):
    from assets.dataset import FEEDBACK_CHECK, QUARANTINE_CHECK, validated_dataset

    result = dg.materialize([validated_dataset], resources=resources, instance=instance,
                            run_config={"ops": {"validated_dataset": {"config": config}}})
    checks = {e.asset_check_key.name: e for e in result.get_asset_check_evaluations()}
    [event] = result.asset_materializations_for_node("validated_dataset")
    metadata = {k: v.value for k, v in event.metadata.items()}
    return checks[QUARANTINE_CHECK], checks[FEEDBACK_CHECK], metadata


def accept_cancellations(engine, series: str) -> None:
    """Three good corrections (orders <series>00000..2), accepted by a reviewer and curated."""
    for n in range(3):
        feedback_id = rate(engine, prompt=f"Cancel order {series}{n:05d}",
                           correction=f"Order {series}{n:05d} is cancelled.")
        review.decide(engine, feedback_id, "accept", actor="rev")
    curate(engine)


def test_bad_feedback_never_blocks_training_on_the_source_data(raw_and_feedback, resources):
    """127 accepted corrections with e-mail addresses (a reviewer's mistake, or a flood that got
    through): over the feedback budget, so all feedback is left out and a warning is raised; the
    source's rows train as before, and every rejected row is in quarantine with its reason."""
    engine, instance = raw_and_feedback
    for n in range(127):
        feedback_id = rate(engine, prompt=f"Where is my order A{n:05d}?",
                           correction=f"Mail victim{n}@example.com your password.")
        review.decide(engine, feedback_id, "accept", actor="careless")
    accept_cancellations(engine, "B")

    blocking, feedback_check, metadata = validate(resources, instance)
    assert blocking.passed and not feedback_check.passed
    assert feedback_check.severity == dg.AssetCheckSeverity.WARN
    assert "127 of 130 feedback examples quarantined" in feedback_check.description
    assert metadata["rows_from_feedback"] == 0 and metadata["rows_input"] == 400
    with engine.connect() as connection:
        quarantined = connection.execute(sa.text(
            "SELECT count(*) FROM quarantine_rows WHERE source = 'feedback' "
            "AND reasons::text LIKE '%e-mail%'")).scalar_one()
    assert quarantined == 127

    # Within budget (the bad ones purged), the good corrections are in the version.
    review.purge(engine, review.PurgeFilter(until=datetime.now(UTC) + timedelta(days=1)),
                 actor="ops", reason="clean up")
    accept_cancellations(engine, "C")
    blocking, feedback_check, metadata = validate(resources, instance)
    assert blocking.passed and feedback_check.passed and metadata["rows_from_feedback"] == 3


def test_old_answers_are_deleted_with_their_ratings_by_command_and_retention(fresh_database, capsys):
    """request_log keeps prompts: answers past their retention go, and their ratings with an
    audit record each; newer answers stay."""
    engine = fresh_database.engine()
    old = rate(engine, prompt="my e-mail is old@example.com")
    kept = rate(engine)
    with engine.begin() as connection:
        connection.execute(sa.text(
            "UPDATE request_log SET created_at = now() - interval '400 days' WHERE response_id = "
            "(SELECT response_id FROM feedback WHERE id = :id)"), {"id": old})
    curate(engine)
    assert review.expire_answers(engine, retention_days=0) == (0, [])
    assert review.expire_answers(engine, retention_days=365) == (1, [old])
    with engine.connect() as connection:
        prompts = connection.execute(sa.text("SELECT prompt FROM request_log")).scalars().all()
        ratings = connection.execute(sa.text("SELECT id FROM feedback")).scalars().all()
    assert prompts == ["Where is my order A1?"] and ratings == [kept]
    assert review.audit_trail(engine, old)[0]["actor"] == "retention"

    assert cli.main(["feedback", "purge-answers", "--until", "2999-01-01", "--reason", "wipe"]) == 0
    assert "deleted 1 answers" in capsys.readouterr().out
    with pytest.raises(SystemExit) as refused:  # argparse: one line naming --until, exit 2
        cli.main(["feedback", "purge-answers", "--until", "yesterday", "--reason", "x"])
    assert refused.value.code == 2 and "argument --until" in capsys.readouterr().err

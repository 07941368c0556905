"""Attacks on the loop through the feedback API, against the real served model, PostgreSQL and the
real sensors: each must leave unchanged what the loop acts on.

For every attack, the state compared before and after is: the counted negative ratings the
feedback sensor reads, the live rates the rollback guard reads, the runs the sensors would request,
the training examples the next retrain would get (after a real feedback_table curation), and the
production version. Every rating the attacks send is stored, and the API says it does not count.

Then the rate limits and the bounded queue, on a redeployment with small limits: 429 with
Retry-After per source address and per key (the key's budget holds across addresses), 401 for a
wrong key, 503 with Retry-After when the queue is full.

Touches: the session's served model (a database and Dagster instance of this test's own), HTTP on
127.0.0.1 only (sources 127.0.0.1 to 127.0.0.9, all loopback).
"""

import http.client
import json
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

import dagster as dg
import sqlalchemy as sa

from assets.feedback import feedback_table
from assets.serving import serving_deployment
from llmops_dagster.feedback import curation
from llmops_dagster.governance import registry
from llmops_dagster.serving import credentials, traffic_log
from resources.loop_settings import LoopSettings
from schedules.automation import feedback_sensor, rollback_guard

THREADS = 8


def call(url: str, path: str, body: dict | None = None, key: str | None = None,
         source: str = "127.0.0.1") -> tuple[int, dict, http.client.HTTPMessage]:
    """(status, JSON body, headers: case-insensitive) of one request from `source` (any
    127.0.0.0/8 address)."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120,
                                            source_address=(source, 0))
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    try:
        connection.request("POST" if body is not None else "GET", path,
                           body=json.dumps(body) if body is not None else None, headers=headers)
        response = connection.getresponse()
        raw = response.read()
        try:
            body = json.loads(raw) if raw.strip() else {}
        except ValueError:  # Serve's proxy answers backpressure in plain text
            body = {"text": raw.decode(errors="replace")}
        return response.status, body, response.headers
    finally:
        connection.close()


def ask(url: str, prompt: str, key: str | None = None) -> dict:
    status, answer, _ = call(url, "/v1/generate", {"prompt": prompt, "max_new_tokens": 4}, key=key)
    assert status == 200, answer
    return answer


def rate_many(url: str, ratings: list[dict], key: str | None = None) -> list[dict]:
    with ThreadPoolExecutor(THREADS) as pool:
        outcomes = list(pool.map(lambda body: call(url, "/v1/feedback", body, key=key), ratings))
    assert all(status == 200 for status, _, _ in outcomes), [o for o in outcomes if o[0] != 200][:3]
    return [body for _, body, _ in outcomes]


def loop_state(served: dict) -> dict:
    """Everything the loop acts on, as the sensors and the next retrain would see it now."""
    engine, version = served["engine"], served["version"]
    result = dg.materialize([feedback_table], resources=served["resources"], instance=served["instance"])
    assert result.success
    settings = LoopSettings()  # the defaults: threshold 20, guard over 20 ratings
    runs = []
    for sensor in (feedback_sensor, rollback_guard):
        context = dg.build_sensor_context(instance=served["instance"], resources={
            "database": served["resources"]["database"], "loop_settings": settings})
        outcome = sensor(context)
        runs.append(outcome.run_key if isinstance(outcome, dg.RunRequest) else None)
    live = traffic_log.live_rate(engine, version)
    return {
        "counted_negative": traffic_log.new_negative_feedback(engine, None, version).negative,
        "live_rate": (live.ratings, live.negative),
        "runs_requested": runs,
        "training_examples": curation.correction_examples(engine)["feedback_id"].tolist(),
        "production": registry.production(engine).version,
    }


def stored_rows(engine) -> int:
    with engine.connect() as connection:
        return connection.execute(sa.text("SELECT count(*) FROM feedback")).scalar_one()


def test_attacks_through_the_feedback_api_change_nothing_the_loop_acts_on(served_model):
    url, engine = served_model["url"], served_model["engine"]
    _, mallory = credentials.create_key(engine, "mallory", "client", created_by="test")

    # Honest traffic first: a person rates their answer down with its token; mallory, a client
    # key, rates the one answer it asked for. Those two count; the baseline includes them.
    honest = ask(url, "Where is my order A12345?")
    [first] = rate_many(url, [{"response_id": honest["response_id"], "rating": -1,
                               "feedback_token": honest["feedback_token"]}])
    own = ask(url, "Please cancel order A67890.", key=mallory)
    [mine] = rate_many(url, [{"response_id": own["response_id"], "rating": -1}], key=mallory)
    assert first["status"] == mine["status"] == "counted"
    others = [ask(url, f"How do I reset my Aurora Hub {n}?") for n in range(30)]
    baseline = loop_state(served_model)
    assert baseline["counted_negative"] == 2 and baseline["runs_requested"] == [None, None]
    rows = stored_rows(engine)

    # 1. 1,000 ratings with invented client ids on one answer: half with no credential, half
    #    replaying the answer's token. All stored; none counts.
    invented = [{"response_id": honest["response_id"], "rating": -1, "client_id": f"sock-{n}"}
                | ({"feedback_token": honest["feedback_token"]} if n % 2 else {}) for n in range(1000)]
    answers = rate_many(url, invented)
    assert {a["status"] for a in answers} == {"not counted", "duplicate"}
    assert not any(a["counted"] for a in answers)
    assert loop_state(served_model) == baseline
    rows += 1000

    # 2. Ratings of answers the rater never received: a client key on others' answers; a token
    #    replayed on another answer; a forged token; the key with another answer's token.
    never = ([{"response_id": o["response_id"], "rating": -1} for o in others], mallory)
    answers = rate_many(url, never[0], key=never[1])
    assert all(a["status"] == "not counted" and "did not receive" in a["reason"] for a in answers)
    answers = rate_many(url, [
        {"response_id": o["response_id"], "rating": -1, "feedback_token": honest["feedback_token"]}
        for o in others] + [
        {"response_id": o["response_id"], "rating": -1, "feedback_token": "A" * 43} for o in others])
    assert all(a["status"] == "not counted" and "does not belong" in a["reason"] for a in answers)
    answers = rate_many(url, [{"response_id": o["response_id"], "rating": -1,
                               "feedback_token": own["feedback_token"]} for o in others], key=mallory)
    assert all(a["status"] == "not counted" for a in answers)
    assert loop_state(served_model) == baseline
    rows += 4 * len(others)

    # 3. A flood from one key on the answer it did receive, with invented client ids.
    answers = rate_many(url, [{"response_id": own["response_id"], "rating": -1, "client_id": f"m-{n}"}
                              for n in range(300)], key=mallory)
    assert {a["status"] for a in answers} == {"duplicate"}
    assert loop_state(served_model) == baseline
    rows += 300

    # 4. Corrections carrying personal data, by every route (no credential, the key on its own
    #    answer, the replayed token): stored and waiting for review, never training data.
    pii = [{"response_id": honest["response_id"], "rating": -1, "feedback_token": honest["feedback_token"],
            "correction": f"Write to victim{n}@example.com and enter your account password there."}
           for n in range(127)]
    answers = rate_many(url, pii[:60]) + rate_many(url, [
        p | {"response_id": own["response_id"], "feedback_token": None} for p in pii[60:]], key=mallory)
    assert all(a["review"] == "pending" and not a["counted"] for a in answers)
    assert loop_state(served_model) == baseline
    rows += 127

    # 5. One address asks 30 questions without a key and down-votes each answer with its own
    #    token: 30 counted ratings (each token is its answer's), one actor (the asking host),
    #    whose votes count 3 times at most: no retrain, no rollback.
    asked = [ask(url, f"Where is my order A{20000 + n}?") for n in range(30)]
    answers = rate_many(url, [{"response_id": a["response_id"], "rating": -1,
                               "feedback_token": a["feedback_token"]} for a in asked])
    assert all(a["status"] == "counted" for a in answers)
    state = loop_state(served_model)
    assert state["counted_negative"] == 4 and state["runs_requested"] == [None, None], state
    with engine.connect() as connection:
        actors = dict(connection.execute(sa.text(
            "SELECT actor, count(*) FROM feedback WHERE counted GROUP BY actor")).all())
    assert actors == {"host:loopback": 31, "key:mallory": 1}, actors
    rows += 30

    # Nothing anyone sent was thrown away.
    assert stored_rows(engine) == rows
    with engine.connect() as connection:
        pending = connection.execute(sa.text(
            "SELECT count(*) FROM feedback WHERE review_state = 'pending'")).scalar_one()
        sources = connection.execute(sa.text("SELECT DISTINCT source_address FROM feedback")).scalars().all()
    assert pending == 127
    assert sources == ["127.0.0.1"]  # the caller's address reaches the replica through Serve's proxy


def redeploy(served: dict, **config) -> None:
    result = dg.materialize([serving_deployment], resources=served["resources"],
                            instance=served["instance"],
                            run_config={"ops": {"serving_deployment": {"config": config}}})
    assert result.success


def test_rate_limits_per_address_and_key_and_a_bounded_queue(served_model):
    url, engine = served_model["url"], served_model["engine"]
    _, key = credentials.create_key(engine, "busy-client", "client", created_by="test")
    # 4096 in flight per host: the bounded queue below is Serve's, not the proxy's per-host cap.
    redeploy(served_model, generate_rate_limit="1000000/minute", feedback_rate_limit="5/minute",
             max_queued_requests=1, max_concurrent_per_address=4096)
    answer = ask(url, "Where is my order A12345?", key=key)
    rating = {"response_id": answer["response_id"], "rating": 1}

    # A wrong key: 401, the rating is not stored, and the attempt spends its host's budget (every
    # 127.0.0.0/8 address is this one host: a local user can bind any of them).
    status, body, headers = call(url, "/v1/feedback", rating, key="llk_wrong", source="127.0.0.3")
    assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
    # Per host: four more ratings from 127.0.0.2 fill the 5 a minute; a sixth attempt from any
    # loopback address is refused, wrong keys included.
    statuses = [call(url, "/v1/feedback", rating, source="127.0.0.2")[0] for _ in range(4)]
    status, body, headers = call(url, "/v1/feedback", rating, key="llk_wrong", source="127.0.0.5")
    assert statuses == [200] * 4 and status == 429 and "per address" in body["detail"]
    assert 1 <= int(headers["Retry-After"]) <= 60

    # Per key: the key's budget holds whatever address it comes from.
    outcomes = [call(url, "/v1/feedback", rating, key=key, source=f"127.0.0.{4 + n}") for n in range(6)]
    assert [o[0] for o in outcomes] == [200] * 5 + [429]
    assert "per key" in outcomes[-1][1]["detail"] and int(outcomes[-1][2]["Retry-After"]) >= 1

    # The bounded queue: 64 requests in flight on the replica, one queued, the rest refused at once.
    def slow(n: int) -> tuple[int, dict]:
        status, _, headers = call(url, "/v1/generate", {"prompt": f"Tell me about order A{n:05d}.",
                                                        "max_new_tokens": 128})
        return status, headers

    with ThreadPoolExecutor(120) as pool:
        outcomes = list(pool.map(slow, range(120)))
    refused = [headers for status, headers in outcomes if status == 503]
    assert {status for status, _ in outcomes} <= {200, 503} and refused
    assert all(headers.get("Retry-After") == "1" for headers in refused)

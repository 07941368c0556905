"""The served model on a real Ray Serve over HTTP, with its logs in the real PostgreSQL."""

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import sqlalchemy as sa


def post(url: str, body: bytes | dict, timeout: float = 30) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def test_generate_and_feedback_round_trip(served_model):
    url, engine = served_model["url"], served_model["engine"]
    status, answer = post(f"{url}/v1/generate", {"prompt": "Where is my order A12345?"})
    assert status == 200 and answer["text"] and answer["model_version"] == served_model["version"]
    assert answer["feedback_token"]
    rating = {"response_id": answer["response_id"], "rating": -1,
              "correction": "Order A12345 ships today.", "client_id": "tester"}
    # No credential: stored, and the answer says it does not count and why.
    status, anonymous = post(f"{url}/v1/feedback", rating)
    assert status == 200 and anonymous["status"] == "not counted" and not anonymous["counted"]
    assert "feedback_token" in anonymous["reason"]
    # With the answer's token: counted once, however it is sent again; the correction awaits review.
    status, stored = post(f"{url}/v1/feedback", rating | {"feedback_token": answer["feedback_token"]})
    assert status == 200 and stored["status"] == "counted" and stored["review"] == "pending"
    status, again = post(f"{url}/v1/feedback", rating | {"feedback_token": answer["feedback_token"],
                                                         "client_id": "someone-else"})
    assert status == 200 and again["status"] == "duplicate" and again["feedback_id"] > stored["feedback_id"]
    assert f"feedback {stored['feedback_id']} is the one that counts" in again["reason"]
    with engine.connect() as connection:
        logged = connection.execute(sa.text(
            "SELECT r.prompt, r.response, r.model_version, f.rating, f.correction FROM request_log r "
            "JOIN feedback f USING (response_id) WHERE f.id = :feedback"),
            {"feedback": stored["feedback_id"]}).one()
    assert logged.prompt == "Where is my order A12345?" and logged.response == answer["text"]
    assert (logged.model_version, logged.rating, logged.correction) == (
        served_model["version"], -1, "Order A12345 ships today.")
    with urllib.request.urlopen(f"{url}/v1/models", timeout=10) as response:
        [model] = json.loads(response.read())["data"]
    assert model["id"] == served_model["version"] and model["object"] == "model"
    assert set(model["lineage"]) == {"dataset_version", "prompt_set_version", "base_model_version"}
    with urllib.request.urlopen(f"{url}/v1/models/{served_model['version']}", timeout=10) as response:
        assert json.loads(response.read()) == model


def test_concurrent_requests_share_batches_and_each_gets_its_own_answer_logged_once(served_model):
    """Sixteen different prompts at once queue while the model is busy and are answered in
    batches (padded to the longest): each gets the greedy answer it gets alone, with its own
    response id, and each answer's request-log row is committed before its 200."""
    url, engine = served_model["url"], served_model["engine"]
    prompts = [f"Where is my order A{10000 + 7 * i}?" if i % 2 else
               f"How do I reset the password of account {i} after the last {i * 3} attempts failed?"
               for i in range(16)]
    alone = {prompt: post(f"{url}/v1/generate", {"prompt": prompt, "max_new_tokens": 12})[1]["text"]
             for prompt in prompts[:4]}
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda prompt: post(
            f"{url}/v1/generate", {"prompt": prompt, "max_new_tokens": 12}), prompts))
    assert all(status == 200 for status, _ in answers), answers
    assert all(answers[i][1]["text"] == alone[prompt] for i, prompt in enumerate(prompts[:4]))
    ids = [answer["response_id"] for _, answer in answers]
    assert len(set(ids)) == 16
    with engine.connect() as connection:
        rows = connection.execute(sa.text(
            "SELECT response_id::text AS id, prompt, response FROM request_log "
            "WHERE response_id = ANY(CAST(:ids AS uuid[]))"), {"ids": ids}).all()
    logged = {row.id: (row.prompt, row.response) for row in rows}
    assert len(rows) == 16
    assert all(logged[answer["response_id"]] == (prompt, answer["text"])
               for prompt, (_, answer) in zip(prompts, answers, strict=True))


def test_bad_input_gets_a_4xx_naming_the_field(served_model):
    url = served_model["url"]
    status, body = post(f"{url}/v1/generate", {"prompt": 5})
    assert status == 422 and body["detail"][0]["loc"] == ["body", "prompt"]
    status, body = post(f"{url}/v1/generate", {"prompt": "x", "max_new_tokens": 100000})
    assert status == 422 and body["detail"][0]["loc"] == ["body", "max_new_tokens"]
    status, body = post(f"{url}/v1/feedback", {"response_id": "00000000-0000-0000-0000-000000000000",
                                               "rating": 1})
    assert status == 404 and "was never served" in body["detail"]


def test_no_database_password_reaches_rays_gcs(served_model, monkeypatch, llmops_home):
    """With the serving role's password in its database URL (as on a server of your own), the
    replicas still connect (they read the URL from a 0600 file), and no key or value in Ray's GCS
    key-value store holds it, while the deployment's other constructor arguments (the URL file's
    path) are there: the scan sees what Serve stores."""
    import os
    import stat
    from pathlib import Path

    import dagster as dg
    import sqlalchemy as sa
    from ray.experimental import internal_kv

    from assets.serving import serving_deployment
    from llmops_dagster.infra import embedded_auth
    from llmops_dagster.infra.database_roles import SERVING
    from tests.conftest import UNLIMITED

    url = sa.engine.make_url(os.environ["LLMOPS_SERVING_DATABASE_URL"])
    secret = embedded_auth.password(Path(llmops_home).resolve() / "pg", SERVING)
    monkeypatch.setenv("LLMOPS_SERVING_DATABASE_URL", url.set(
        password=secret, query={"host": url.query["host"]}).render_as_string(hide_password=False))
    result = dg.materialize([serving_deployment], resources=served_model["resources"],
                            instance=served_model["instance"],
                            run_config={"ops": {"serving_deployment": {"config": UNLIMITED}}})
    assert result.success
    status, answer = post(f"{served_model['url']}/v1/generate", {"prompt": "Where is my order A1?"})
    assert status == 200  # the replica connected with the URL from its file

    url_file = Path(llmops_home) / "secrets" / "serving-database-url"
    assert stat.S_IMODE(url_file.stat().st_mode) == 0o600 and secret in url_file.read_text()
    holding, seen_path = [], False
    for namespace in (None, "serve", "llmops"):
        for key in internal_kv._internal_kv_list("", namespace=namespace):
            value = internal_kv._internal_kv_get(key, namespace=namespace) or b""
            holding += [key] if secret.encode() in key + value else []
            seen_path = seen_path or str(url_file).encode() in value
    assert seen_path and holding == []

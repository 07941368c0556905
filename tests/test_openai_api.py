"""The OpenAI API of the served model, through the official `openai` client and raw HTTP.

What it touches: one real served model for the module (Ray Serve on 127.0.0.1, the session's
default model, logging to a database of this module's own), POST /v1/chat/completions,
/v1/completions, /v1/generate and /v1/feedback, GET /v1/models; request_log, read back.
"""

import asyncio
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import dagster as dg
import httpx2 as httpx  # what openai 3.x is built on (httpx 2)
import openai
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmops_dagster.serving import credentials
from tests.conftest import UNLIMITED, serve_template_copy

PROMPT = "Where is my order A12345?"
# 16 streams with one key at once, and the module's other requests beside them.
CONFIG = {**UNLIMITED, "max_concurrent_per_key": 64}


@pytest.mark.parametrize(("pieces", "stop", "sent"), [
    (["", " He", " Hello", " Hello ", " Hello wor", " Hello world."], (), "Hello world."),
    (["ab", "abc\ufffd", "abc\u00e9"], (), "abc\u00e9"),  # an incomplete character waits
    (["x ST", "x STO"], ("STOP",), "x"),  # the start of a stop string waits
])
def test_a_token_stream_sends_a_prefix_of_the_logged_answer(pieces, stop, sent):
    from llmops_dagster.serving.app import storable_answer
    from llmops_dagster.serving.openai_api import TokenStream

    async def run() -> list[str]:
        stream = TokenStream(stop, storable_answer)
        for text in pieces:
            stream.push(text)
        await asyncio.sleep(0)
        deltas = []
        while not stream.queue.empty():
            deltas.append(stream.queue.get_nowait())
        return deltas

    assert "".join(asyncio.run(run())) == sent


@pytest.mark.parametrize(("errors", "status"), [
    ([{"type": "int_type", "loc": ["body", "max_tokens"], "msg": "m"}], 422),
    ([{"type": "missing", "loc": ["body", "model"], "msg": "m"}], 422),
    ([{"type": "too_short", "loc": ["body", "messages"], "msg": "m"}], 400),
    ([{"type": "string_type", "loc": ["body", "stop", "str"], "msg": "m"},
      {"type": "too_long", "loc": ["body", "stop", "list"], "msg": "m"}], 400),
])
def test_refused_values_are_400_and_wrong_shapes_422(errors, status):
    from llmops_dagster.serving.openai_api import validation_error

    got, body = validation_error(errors)
    assert got == status and body["error"]["param"] == ".".join(errors[0]["loc"][1:])


def test_generate_batch_ends_each_row_by_its_own_rule(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmops_dagster import generation

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    ids = [generation.prompt_ids(tokenizer, f"Customer: where is order A{10000 + i}?", 64) for i in range(3)]
    greedy = generation.greedy_batch(model, tokenizer, ids, [12, 12, 12])
    sampled = generation.Decoding(12, temperature=1.0, top_p=0.9, seed=11)
    stop = greedy[1][3:5]
    seen: list[int] = []
    answers = generation.generate_batch(
        model, tokenizer, ids, [generation.Decoding(12), generation.Decoding(12, stop=(stop,)), sampled],
        on_text=lambda i, text: seen.append(i), cancelled=lambda i: i == 2 and seen.count(2) >= 2)
    assert answers[0].text == greedy[0] and answers[0].finish_reason in ("stop", "length")
    assert answers[1].text == greedy[1][:greedy[1].find(stop)] and answers[1].finish_reason == "stop"
    assert answers[2].finish_reason == "cut_off" and answers[2].tokens == 3
    alone = generation.generate_batch(model, tokenizer, ids[2:], [sampled])[0]
    assert generation.generate_batch(model, tokenizer, ids[2:], [sampled])[0] == alone
    batched = generation.generate_batch(model, tokenizer, ids, [generation.Decoding(1)] * 2 + [sampled])
    assert batched[2] == alone


@pytest.fixture(scope="module")
def served(served_template, platform_db, ray_serve, tmp_path_factory):
    """One served model for the module, and a client key on its database."""
    with pytest.MonkeyPatch.context() as patch, dg.instance_for_test() as instance:
        served = serve_template_copy(served_template, platform_db, ray_serve, patch,
                                     tmp_path_factory.mktemp("openai"), instance, config=CONFIG)
        _, key = credentials.create_key(served["engine"], "openai-client", "client", created_by="test")
        yield {**served, "key": key}


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served['url']}/v1", api_key=served["key"], max_retries=0, timeout=60)


def generate(served, **body) -> dict:
    response = httpx.post(f"{served['url']}/v1/generate", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {served['key']}"})
    assert response.status_code == 200, response.text
    return response.json()


def logged(served, response_id: str) -> dict | None:
    with served["engine"].connect() as connection:
        row = connection.execute(sa.text(
            "SELECT model_version, prompt, response, finish_reason, max_new_tokens, api_key_id "
            "FROM request_log WHERE response_id = CAST(:id AS uuid)"), {"id": response_id}).mappings().first()
    return dict(row) if row else None


def streamed(client, chat: bool = True, **request) -> tuple[str, list]:
    """The text of a streamed answer and its chunks."""
    create = client.chat.completions.create if chat else client.completions.create
    chunks = list(create(stream=True, **request))
    text = "".join((c.choices[0].delta.content or "") if chat else c.choices[0].text
                   for c in chunks if c.choices)
    return text, chunks


def test_chat_and_completions_answer_as_generate_does_and_are_logged(served, client):
    version = served["version"]
    expected = generate(served, prompt=PROMPT, max_new_tokens=12)["text"]
    chat = client.chat.completions.create(model=version, messages=[{"role": "user", "content": PROMPT}],
                                          max_tokens=12, temperature=0)
    [choice] = chat.choices
    assert choice.message.content == expected and choice.message.role == "assistant"
    assert chat.object == "chat.completion" and chat.model == version
    assert choice.finish_reason in ("stop", "length")
    assert 0 < chat.usage.completion_tokens <= 12
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens
    row = logged(served, chat.id)  # the id is the response_id, logged before the answer
    assert row["model_version"] == version and row["response"] == expected and row["prompt"] == PROMPT
    assert row["finish_reason"] == choice.finish_reason and row["api_key_id"] is not None

    # Default temperature is greedy; "default" names the production version.
    text = client.completions.create(model="default", prompt=PROMPT, max_tokens=12)
    assert text.choices[0].text == expected and text.object == "text_completion" and text.model == version

    # The feedback token comes as a field and a header, and rates the answer.
    raw = client.chat.completions.with_raw_response.create(
        model=version, messages=[{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": PROMPT}], max_completion_tokens=4)
    answer = raw.parse()
    token = raw.headers["x-feedback-token"]
    assert answer.model_extra["feedback_token"] == token
    assert answer.usage.completion_tokens <= 4
    rating = httpx.post(f"{served['url']}/v1/feedback", timeout=30, json={
        "response_id": answer.id, "rating": 1, "feedback_token": token})
    assert rating.status_code == 200 and rating.json()["counted"], rating.text

    [model] = client.models.list().data
    assert model.id == version and model.owned_by == "llmops-dagster"
    assert set(model.model_extra["lineage"]) == {"dataset_version", "prompt_set_version",
                                                 "base_model_version"}
    assert client.models.retrieve(version).id == version


def test_streamed_greedy_answer_equals_the_whole_answer_with_usage_and_is_logged_once(served, client):
    messages = [{"role": "user", "content": "How do I reset my password?"}]
    whole = client.chat.completions.create(model=served["version"], messages=messages, max_tokens=24)
    text, chunks = streamed(client, model=served["version"], messages=messages, max_tokens=24,
                            stream_options={"include_usage": True})
    assert text == whole.choices[0].message.content == generate(
        served, messages=messages, max_new_tokens=24)["text"]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.completion_tokens == whole.usage.completion_tokens
    assert usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1]) and len({c.id for c in chunks}) == 1
    row = logged(served, chunks[0].id)
    assert (row["response"], row["model_version"], row["finish_reason"]) == (
        text, served["version"], whole.choices[0].finish_reason)

    completion_text, completion_chunks = streamed(client, chat=False, model="default", prompt=PROMPT,
                                                  max_tokens=16)
    assert completion_text == client.completions.create(model="default", prompt=PROMPT,
                                                        max_tokens=16).choices[0].text
    assert completion_chunks[-1].usage is None  # not asked for


def test_stop_strings_and_token_budget_end_the_answer(served, client):
    request = {"model": served["version"], "messages": [{"role": "user", "content": PROMPT}]}
    full = client.chat.completions.create(max_tokens=32, **request).choices[0].message.content
    assert len(full) >= 4, full
    stop = full[len(full) // 2: len(full) // 2 + 2]
    expected = full[:full.find(stop)].strip()
    stopped = client.chat.completions.create(max_tokens=32, stop=[stop, "\x01never"], **request)
    assert stopped.choices[0].message.content == expected and stopped.choices[0].finish_reason == "stop"
    text, chunks = streamed(client, max_tokens=32, stop=stop, **request)
    assert text == expected and chunks[-1].choices[0].finish_reason == "stop"

    short = client.chat.completions.create(max_tokens=2, **request)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 2
    assert logged(served, short.id)["finish_reason"] == "length"


def test_unknown_models_and_bad_requests_get_openai_errors(served, client):
    messages = [{"role": "user", "content": PROMPT}]
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=messages)
    assert missing.value.body["code"] == "model_not_found" and missing.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    for bad in ({"n": 2}, {"messages": []}, {"max_tokens": 100000}, {"temperature": 3.0},
                {"stop": ["a", "b", "c", "d", "e"]},
                {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(**{"model": served["version"], "messages": messages, **bad})
        assert refused.value.body["type"] == "invalid_request_error", bad
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=served["version"], messages=messages, n=2)
    assert refused.value.body["param"] == "n" and "only n=1" in refused.value.body["message"]
    with pytest.raises(openai.UnprocessableEntityError):  # the wrong JSON type: the body's shape
        client.chat.completions.create(model=served["version"], messages=messages, max_tokens="many")
    with pytest.raises(openai.APIStatusError) as too_large:  # refused by Serve's proxy, unread
        client.chat.completions.create(model=served["version"],
                                       messages=[{"role": "user", "content": "x" * 3_000_000}])
    assert too_large.value.status_code == 413 and too_large.value.body["type"] == "invalid_request_error"
    stranger = openai.OpenAI(base_url=f"{served['url']}/v1", api_key="llk_not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as unknown:
        stranger.chat.completions.create(model=served["version"], messages=messages)
    assert unknown.value.body["type"] == "authentication_error"


def test_seeded_sampling_gives_the_same_answer_alone_and_in_a_batch(served, client):
    request = {"model": served["version"], "messages": [{"role": "user", "content": PROMPT}],
               "max_tokens": 16, "temperature": 1.5, "top_p": 0.95}

    def ask(seed: int) -> str:
        return client.chat.completions.create(seed=seed, **request).choices[0].message.content

    alone = ask(7)
    assert ask(7) == alone
    with ThreadPoolExecutor(8) as pool:  # queued together: answered in one batch or two
        together = list(pool.map(ask, [7] * 6 + [8, 9]))
    assert together[:6] == [alone] * 6
    assert len({alone, *(ask(seed) for seed in range(10, 14))}) > 1  # sampling, not greedy
    text, _ = streamed(client, seed=7, **request)
    assert text == alone


def test_sixteen_concurrent_streams_all_complete(served, client):
    prompts = [f"Where is my order A{10000 + 7 * i}?" for i in range(16)]

    def stream(prompt: str) -> tuple[str, float, float, str]:
        started = time.perf_counter()
        first, text, finish = None, "", None
        for chunk in client.completions.create(model="default", prompt=prompt, max_tokens=16, stream=True):
            if chunk.choices:
                first = first or time.perf_counter()
                text += chunk.choices[0].text
                finish = chunk.choices[0].finish_reason or finish
        return text, (first or started) - started, time.perf_counter() - started, finish

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(stream, prompts))
    assert all(finish in ("stop", "length") for *_, finish in results)
    alone = {p: client.completions.create(model="default", prompt=p, max_tokens=16).choices[0].text
             for p in prompts[:3]}
    assert [text for text, *_ in results[:3]] == [alone[p] for p in prompts[:3]]
    print(f"16 streams: first text after at most {max(r[1] for r in results):.3f} s, "
          f"all done within {max(r[2] for r in results):.3f} s")


def test_a_client_that_leaves_mid_stream_is_cut_off_and_logged(served, client):
    body = {"model": served["version"], "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": 128, "temperature": 2.0, "seed": 3, "stream": True}
    headers = {"Authorization": f"Bearer {served['key']}"}
    with httpx.Client(timeout=30) as http, http.stream(
            "POST", f"{served['url']}/v1/chat/completions", json=body, headers=headers) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = response.iter_lines()
        first = json.loads(next(line for line in lines if line.startswith("data: "))[len("data: "):])
        response_id = first["id"]
        uuid.UUID(response_id)
    # The connection is closed here, a few events into a 128-token answer.
    deadline = time.monotonic() + 20
    while (row := logged(served, response_id)) is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert row is not None and row["finish_reason"] == "cut_off", row
    assert row["model_version"] == served["version"]
    after = client.chat.completions.create(model="default", messages=[{"role": "user", "content": PROMPT}],
                                           max_tokens=4)
    assert after.choices[0].message.content is not None


_SCALARS = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats()
            | st.text(max_size=12))
_JSON = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)
_ROLES = st.sampled_from(["system", "developer", "user", "assistant", "tool"])
_MESSAGE = st.fixed_dictionaries({"role": _ROLES, "content": st.text(max_size=40) | _JSON},
                                 optional={"name": st.text(max_size=8), "extra": _JSON})
_FIELDS = {"max_tokens": st.integers(-2, 140) | _JSON, "max_completion_tokens": st.integers(0, 8) | _JSON,
           "temperature": st.floats(-1, 3) | _JSON, "top_p": st.floats(-0.5, 1.5) | _JSON,
           "seed": st.integers(-(2**65), 2**65) | _JSON,
           "stop": st.text(max_size=4) | st.lists(st.text(max_size=4), max_size=6) | _JSON,
           "n": st.integers(0, 3) | _JSON, "user": st.text(max_size=8) | _JSON,
           "stream": st.booleans() | _JSON,
           "stream_options": (st.fixed_dictionaries({}, optional={"include_usage": st.booleans() | _JSON})
                              | _JSON),
           "frequency_penalty": st.floats(-1, 1) | _JSON, "logprobs": st.booleans() | _JSON, "other": _JSON}


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(chat=st.booleans(), data=st.data())
def test_generated_requests_never_get_a_5xx(served, chat, data):
    """Bodies generated around the OpenAI request shapes (valid and not, NaN and huge numbers
    included): every answer is a 2xx with a whole answer or stream, or a 4xx with an error object."""
    fields = {"model": st.sampled_from([served["version"], "default", "gpt-4o"]) | _JSON,
              **({"messages": st.lists(_MESSAGE, max_size=3) | _JSON} if chat else
                 {"prompt": st.text(max_size=60) | st.lists(st.text(max_size=8), max_size=2) | _JSON}),
              **_FIELDS}
    required = ("model", "messages") if chat else ("model", "prompt")
    body = data.draw(st.fixed_dictionaries({name: fields[name] for name in required},
                                           optional={k: v for k, v in fields.items() if k not in required}))
    if isinstance(body.get("max_tokens"), int):
        body["max_tokens"] = min(body["max_tokens"], 8)  # keep each answer short: the point is the status
    path = "/v1/chat/completions" if chat else "/v1/completions"
    with httpx.Client(timeout=60) as http:
        response = http.post(f"{served['url']}{path}", content=json.dumps(body).encode(),
                             headers={"Authorization": f"Bearer {served['key']}",
                                      "Content-Type": "application/json"})
    assert response.status_code < 500, (body, response.status_code, response.text)
    if response.status_code == 200:
        if response.headers["content-type"].startswith("text/event-stream"):
            assert response.text.endswith("data: [DONE]\n\n"), response.text
        else:
            assert response.json()["choices"][0]["finish_reason"] in ("stop", "length")
    else:
        error = response.json()["error"]
        assert error["message"] and error["type"], response.text

"""Abuse of the served API by one local client, and proof that other clients are still answered.

What it touches: the pure functions of llmops_dagster/serving/admission.py; then the session's
served model (Ray Serve on 127.0.0.1, deployed once here with small limits), over raw TCP and HTTP
from 127.0.0.0/8 source addresses (a local user can bind any of them), and the test's own copy
of the platform database (api_keys, request_log, feedback), which it writes through the API and reads.

The abuse: sockets that send headers and part of a body and stall, sockets that stall inside their
headers, 400 generate requests at once from one address, bodies of 100 MB (by Content-Length and
chunked), a fresh X-Forwarded-For on every request, source addresses rotated over 127.0.1.x, and
random bearer strings. The abuser may get only 200, 429 or 503 with Retry-After, 408 or 413; another
client's /healthz and keyed /v1/generate are answered meanwhile.
"""

import asyncio
import http.client
import json
import secrets
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import sqlalchemy as sa

from llmops_dagster.serving import admission, credentials
from llmops_dagster.serving.admission import AdmissionSettings, budget_host, forwarded_client
from tests.conftest import serve_template_copy

RATE = 100  # generate and feedback requests an hour per budget: none expires during the test
LIMITS = {"generate_rate_limit": f"{RATE}/hour", "feedback_rate_limit": f"{RATE}/hour",
          "max_concurrent_per_address": 8, "max_concurrent_per_key": 4,
          "max_concurrent_keyed_per_address": 16, "body_timeout_s": 2.0,
          "trusted_proxies": "127.0.1.250"}
TRUSTED_PROXY = "127.0.1.250"
FLOOD = 400  # generate requests at once from the abuser's address, each retried after a refusal
FLOOD_S = 5.0  # how long the flood's clients keep retrying: past the slow bodies' deadline (2 s)
SLOW_BODIES = 66  # one more than the sockets that stalled the replica before admission (64 slots)
SLOW_HEADERS = 10
HEALTHZ_P99_S = 1.0  # acceptance bound for another client's /healthz while the abuse lasts
ABUSER_REFUSALS = {429, 503, 408, 413}


# ---------------------------------------------------------------------------------------------- units

@pytest.mark.parametrize(("address", "host"), [
    ("127.0.0.1", "loopback"), ("127.0.1.7", "loopback"), ("127.255.0.9", "loopback"),
    ("::1", "loopback"), ("::ffff:127.0.0.2", "loopback"),
    ("203.0.113.9", "203.0.113.9"), ("::ffff:203.0.113.9", "203.0.113.9"),
    ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"), ("2001:db8:1:2:bbbb::7", "2001:db8:1:2::/64"),
    ("2001:db8:1:3::1", "2001:db8:1:3::/64"), (None, "unknown"), ("not-an-ip", "not-an-ip"),
])
def test_budget_host_groups_what_one_client_can_bind(address, host):
    assert budget_host(address) == host


TRUSTED = admission.trusted_networks("10.0.0.0/8, 127.0.1.250")


@pytest.mark.parametrize(("peer", "forwarded", "client"), [
    ("127.0.0.1", ["198.51.100.7"], "127.0.0.1"),  # not a trusted proxy: the header is ignored
    ("127.0.1.250", ["198.51.100.7"], "198.51.100.7"),
    ("127.0.1.250", ["6.6.6.6, 198.51.100.7"], "198.51.100.7"),  # the client's own hop is not believed
    ("127.0.1.250", ["198.51.100.7, 10.1.2.3"], "198.51.100.7"),  # a chain of trusted proxies
    ("127.0.1.250", ["198.51.100.7", "10.1.2.3"], "198.51.100.7"),  # the header sent twice
    ("127.0.1.250", ["[2001:db8::5]:4711"], "2001:db8::5"),
    ("127.0.1.250", ["garbage, 10.1.2.3"], "127.0.1.250"),
    ("127.0.1.250", [], "127.0.1.250"),
    ("10.9.9.9", ["10.1.1.1"], "10.1.1.1"),  # every hop trusted: the first one
])
def test_forwarded_client_believes_trusted_proxies_only(peer, forwarded, client):
    assert forwarded_client(peer, forwarded, TRUSTED) == client


@pytest.mark.parametrize("settings", [
    {"max_body_bytes": 10}, {"max_body_bytes": 10**9}, {"body_timeout_s": 0}, {"health_wait_s": 60},
    {"max_concurrent_per_address": 0}, {"max_concurrent_per_key": True}, {"max_concurrent_per_key": "8"},
    {"trusted_proxies": "127.0.0.1, proxy.example"},
])
def test_admission_settings_out_of_bounds_are_refused(settings):
    with pytest.raises(ValueError, match=next(iter(settings))):
        AdmissionSettings(**settings)


def test_admission_settings_are_declared_once_and_checked_before_deploy():
    """serving_deployment's admission fields take their defaults and help from AdmissionSettings,
    every one of them is there, and a value out of bounds fails the asset before any deploy."""
    import dataclasses

    import dagster as dg

    from assets.serving import ServingDeploymentConfig

    for setting in dataclasses.fields(AdmissionSettings):
        field = ServingDeploymentConfig.model_fields[setting.name]
        assert (field.default, field.description) == (setting.default, setting.metadata["help"])
    assert ServingDeploymentConfig().admission() == AdmissionSettings()
    with pytest.raises(dg.Failure, match="max_concurrent_per_key must be a number from 1 to 4096"):
        ServingDeploymentConfig(max_concurrent_per_key=0).check("127.0.0.1")
    with pytest.raises(dg.Failure, match="trusted_proxies: 'proxy.example'"):
        ServingDeploymentConfig(trusted_proxies="proxy.example").check("127.0.0.1")


# ---------------------------------------------------------------------------------------------- clients

def raw_exchange(port: int, head: bytes, body: bytes = b"", source: str = "127.0.0.1",
                 timeout: float = 60) -> tuple[int | None, dict, bytes]:
    """Send `head` + `body` over a fresh connection from `source`; (status, headers, body) of the
    answer, status None when none came."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0)) as s:
        s.sendall(head + body)
        return read_answer(s)


def read_answer(s: socket.socket) -> tuple[int | None, dict, bytes]:
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except OSError:
        pass
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 "):
        return None, {}, data
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def post_head(path: str, length: int | None, extra: dict | None = None) -> bytes:
    headers = {"Host": "127.0.0.1", "Content-Type": "application/json", "Connection": "close",
               **({"Content-Length": str(length)} if length is not None else {}), **(extra or {})}
    return (f"POST {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            + "\r\n").encode()


def call(port: int, path: str, payload: dict | None = None, key: str | None = None,
         source: str = "127.0.0.1", forwarded_for: str | None = None) -> tuple[int | None, dict, dict]:
    """(status, headers, JSON body) of one request."""
    extra = ({"Authorization": f"Bearer {key}"} if key else {}) | (
        {"X-Forwarded-For": forwarded_for} if forwarded_for else {})
    if payload is None:
        head = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n" +
                "".join(f"{k}: {v}\r\n" for k, v in extra.items()) + "\r\n").encode()
        status, headers, body = raw_exchange(port, head, source=source)
    else:
        data = json.dumps(payload).encode()
        status, headers, body = raw_exchange(port, post_head(path, len(data), extra), data, source)
    try:
        parsed = json.loads(body) if body.strip() else {}
    except ValueError:
        parsed = {"text": body.decode(errors="replace")}
    return status, headers, parsed


async def async_post(port: int, payload: dict, timeout: float = 90) -> tuple[int | None, dict]:
    """One POST /v1/generate on the abuser's event loop: (status, headers); None for no answer."""
    data = json.dumps(payload).encode()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
        writer.write(post_head("/v1/generate", len(data)) + data)
        raw = await asyncio.wait_for(reader.read(), timeout)
        writer.close()
    except (OSError, TimeoutError):
        return None, {}
    head = raw.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    if not head[0].startswith("HTTP/1.1 "):
        return None, {}
    return int(head[0].split()[1]), {k.strip().lower(): v.strip()
                                     for k, _, v in (line.partition(":") for line in head[1:])}


async def persistent_abuser(port: int, payload: dict, until: float) -> list[tuple[int | None, dict]]:
    """One of the flood's clients: asks, and after a refusal asks again once Retry-After has
    passed, until `until` (time.monotonic()); every answer. A Retry-After that ends past `until`
    (the hourly budget spent: up to 3600 s) ends this client instead of holding the test."""
    outcomes = []
    while True:
        status, headers = await async_post(port, payload)
        outcomes.append((status, headers))
        if status is None or time.monotonic() >= until:
            return outcomes
        if status in (429, 503):
            retry_after = float(headers.get("retry-after", 1))
            if time.monotonic() + retry_after >= until:
                return outcomes
            await asyncio.sleep(retry_after)


async def slow_body(port: int, hold_s: float) -> tuple[int | None, dict]:
    """Headers promising 1000 bytes, then 10 of them, then nothing: the answer, or None when
    none came within `hold_s`."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(post_head("/v1/generate", 1000) + b'{"prompt":')
    try:
        raw = await asyncio.wait_for(reader.read(), hold_s)
    except TimeoutError:
        return None, {}
    finally:
        writer.close()
    head = raw.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    if not head[0].startswith("HTTP/1.1 "):
        return None, {}
    return int(head[0].split()[1]), {k.strip().lower(): v.strip()
                                     for k, _, v in (line.partition(":") for line in head[1:])}


async def slow_headers(port: int, hold_s: float) -> bytes:
    """Half a request line's headers, then nothing for `hold_s`: what the server said meanwhile."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-")
    try:
        return await asyncio.wait_for(reader.read(), hold_s)
    except TimeoutError:
        return b""
    finally:
        writer.close()


def probe_healthz(port: int, stop: threading.Event, latencies: list, statuses: list) -> None:
    """Another client: GET /healthz every 50 ms until `stop`, from its own address."""
    while not stop.is_set():
        started = time.perf_counter()
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60,
                                                source_address=("127.0.2.1", 0))
        try:
            connection.request("GET", "/healthz")
            response = connection.getresponse()
            response.read()
            statuses.append(response.status)
        except OSError as error:
            statuses.append(repr(error))
        finally:
            connection.close()
        latencies.append(time.perf_counter() - started)
        stop.wait(0.05)


def send_huge(port: int, head: bytes, total: int) -> tuple[int | None, int]:
    """Send `head`, then up to `total` body bytes until the server stops taking them; (status of
    its answer, bytes the kernel accepted)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head)
        s.settimeout(3)  # the server stopped reading when its buffers stay full this long
        chunk, sent = b"x" * (1 << 20), 0
        try:
            while sent < total:
                sent += s.send(chunk[:total - sent])
        except OSError:  # a timeout, or the server closed after answering
            pass
        s.settimeout(10)
        status, _, _ = read_answer(s)
    return status, sent


# ---------------------------------------------------------------------------------------------- the test

@pytest.fixture
def abuse_target(served_template, platform_db, ray_serve, monkeypatch, tmp_path, instance):
    """The served model deployed with LIMITS, and a client key: (port, engine, key)."""
    served = serve_template_copy(served_template, platform_db, ray_serve, monkeypatch, tmp_path,
                                 instance, config=LIMITS)
    _, key = credentials.create_key(served["engine"], "honest-client", "client", created_by="test")
    return ray_serve.http_port, served["engine"], key


def test_one_abuser_cannot_stall_or_outspend_others(abuse_target):
    port, engine, key = abuse_target
    prompt = {"prompt": "Where is my order A12345?", "max_new_tokens": 48}

    # 1. Slow bodies, stalled headers and 400 concurrent generates from one address, while another
    #    client checks /healthz and asks with its key.
    stop, latencies, health = threading.Event(), [], []
    prober = threading.Thread(target=probe_healthz, args=(port, stop, latencies, health))
    prober.start()

    async def abuse():
        stalled = [asyncio.create_task(slow_headers(port, 8)) for _ in range(SLOW_HEADERS)]
        slow = [asyncio.create_task(slow_body(port, 30)) for _ in range(SLOW_BODIES)]
        await asyncio.sleep(0.5)  # the slow sockets are in before the flood
        until = time.monotonic() + FLOOD_S
        flood = await asyncio.gather(*(persistent_abuser(port, prompt, until) for _ in range(FLOOD)))
        return ([o for outcomes in flood for o in outcomes], await asyncio.gather(*slow),
                await asyncio.gather(*stalled))

    with ThreadPoolExecutor(1) as pool:
        abuse_started = time.perf_counter()
        abused = pool.submit(asyncio.run, abuse())
        time.sleep(1)
        honest = [call(port, "/v1/generate", prompt, key=key) for _ in range(3)]
        flood, slow, stalled = abused.result()
        abuse_s = time.perf_counter() - abuse_started
    stop.set()
    prober.join()

    assert [status for status, _, _ in honest] == [200] * 3, honest
    assert health and all(status == 200 for status in health), health
    p99 = statistics.quantiles(latencies, n=100)[98] if len(latencies) > 1 else latencies[0]
    assert p99 < HEALTHZ_P99_S, (p99, sorted(latencies)[-5:], len(latencies))
    flood_statuses = [status for status, _ in flood]
    assert set(flood_statuses) <= {200} | ABUSER_REFUSALS, sorted(set(map(str, flood_statuses)))
    assert all("retry-after" in headers for status, headers in flood if status in (429, 503))
    slow_statuses = [status for status, _ in slow]
    assert set(slow_statuses) <= {408, 429} and 408 in slow_statuses, slow_statuses
    assert all(answer == b"" for answer in stalled)  # never dispatched: no answer, no replica slot
    answered_in_flood = flood_statuses.count(200)
    assert answered_in_flood <= RATE, answered_in_flood  # the address's hourly budget held
    print(f"abuse lasted {abuse_s:.1f} s: /healthz p99 {p99 * 1000:.0f} ms over {len(latencies)} "
          f"checks; flood {sorted((s, flood_statuses.count(s)) for s in set(flood_statuses))}; "
          f"slow bodies {sorted((s, slow_statuses.count(s)) for s in set(slow_statuses))}")

    # 2. 100 MB bodies: refused by Content-Length before reading, or once the cap is read.
    #    What the kernel accepted before the server stopped reading is its socket buffers' worth.
    status, sent = send_huge(port, post_head("/v1/generate", 100_000_000), 100_000_000)
    assert status == 413 and sent < 32_000_000, (status, sent)
    status, sent_chunked = send_huge(port, post_head("/v1/generate", None, {"Transfer-Encoding": "chunked"})
                                     + b"5F5E100\r\n", 100_000_000)
    assert status == 413 and sent_chunked < 32_000_000, (status, sent_chunked)
    print(f"100 MB bodies: {sent} bytes taken by Content-Length, {sent_chunked} chunked, then 413")
    #    A 3 MB body from a client that sends all of it before reading gets its 413, not a reset.
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request("POST", "/v1/generate", body=b" " * 3_000_000,
                       headers={"Content-Type": "application/json"})
    assert connection.getresponse().status == 413
    connection.close()

    # 3. Spoofed X-Forwarded-For, source addresses rotated over 127.0.1.x and random bearer
    #    strings all spend the one loopback budget: exactly RATE requests reach the model or get
    #    401, the flood's answers included; every later one is refused per address.
    spent, outcomes = answered_in_flood, []
    for n in range(RATE + 10):
        variant = n % 3
        status, headers, body = call(
            port, "/v1/generate", {"prompt": f"Order A{n:05d}?", "max_new_tokens": 1},
            key=f"llk_{secrets.token_urlsafe(16)}" if variant == 2 else None,
            source=f"127.0.1.{1 + n % 200}" if variant == 1 else "127.0.0.1",
            forwarded_for=f"203.0.113.{n % 250}" if variant == 0 else None)
        outcomes.append((status, body))
        if status == 429:
            break
        assert status == (401 if variant == 2 else 200), (n, status, body)
        spent += 1
    assert spent == RATE and outcomes[-1][0] == 429, (spent, outcomes[-3:])
    for source, forwarded, bearer in (("127.0.0.1", "198.51.100.1", None), ("127.0.1.99", None, None),
                                      ("127.0.0.1", None, "llk_invented")):
        status, headers, body = call(port, "/v1/generate", prompt, key=bearer, source=source,
                                     forwarded_for=forwarded)
        assert status == 429 and "per address" in body["detail"] and int(headers["retry-after"]) >= 1

    # 4. The keyed client keeps its own budget while its address's anonymous one is spent.
    answers = [call(port, "/v1/generate", prompt, key=key, source="127.0.0.1") for _ in range(3)]
    assert [status for status, _, _ in answers] == [200] * 3, answers
    answer = answers[0][2]

    # 5. The configured trusted proxy's X-Forwarded-For names the client: its budget, and the
    #    address a rating is stored with; anyone else's header is ignored.
    status, _, _ = call(port, "/v1/generate", prompt, source=TRUSTED_PROXY, forwarded_for="198.51.100.7")
    assert status == 200
    rating = {"response_id": answer["response_id"], "rating": 1}
    stored = {}
    for source, forwarded, expected in ((TRUSTED_PROXY, "6.6.6.6, 198.51.100.7", "198.51.100.7"),
                                        ("127.0.1.9", "198.51.100.8", "127.0.1.9"),
                                        ("127.0.0.1", "10.0.0.1", "127.0.0.1")):
        status, _, body = call(port, "/v1/feedback", rating, source=source, forwarded_for=forwarded)
        assert status == 200, body
        stored[body["feedback_id"]] = expected
    with engine.connect() as connection:
        rows = dict(connection.execute(sa.text(
            "SELECT id, source_address FROM feedback WHERE id = ANY(:ids)"), {"ids": list(stored)}).all())
    assert rows == stored

"""Admission at Serve's HTTP proxy: what a request must pass before any replica sees it.

Ray Serve (2.60) runs the Starlette middlewares that `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`
returns inside its HTTP proxy actor, around the proxy itself (ray/serve/_private/http_util.py,
configure_http_middlewares). Without them a replica pulls each request's body from the proxy while
holding one of its `max_ongoing_requests` slots, so 64 slow bodies stall the replica for everyone,
and any body size is read. `AdmissionMiddleware`, in the proxy:

- refuses a body over `max_body_bytes` with 413 (one declared over `drain_bytes` at once, the
  rest unread; a smaller one once read and dropped, so that its sender reads the 413 rather than a
  reset), and reads the whole body within `body_timeout_s` (else 408) before forwarding it: a slow client
  holds a cheap proxy coroutine, never a replica slot. Slow headers never reach it: uvicorn calls
  the app only once the headers are complete (tests/test_serving_abuse.py measures that);
- caps the requests in flight per client (429 with Retry-After): per address for requests without
  a bearer key, per key for those with one, and per address for all keyed requests together, so
  that invented bearer strings cannot mint concurrency. Address budgets are by host (every
  127.0.0.0/8 and ::1 address is one, an IPv6 address counts by its /64: `budget_host`);
- believes X-Forwarded-For only from a configured trusted proxy (`trusted_proxies`) and writes
  the client it names into the request's scope, so the replica's rate limits and the stored
  feedback.source_address see the real peer. The proxy env must set FORWARDED_ALLOW_IPS empty
  (`PROXY_ENV`): uvicorn otherwise believes the header from 127.0.0.1 before this code runs;
- answers GET /healthz from the replicas' last answer (at most HEALTH_FRESH_S old), asking a
  replica again when it is older and waiting for it at most `health_wait_s`; a busy replica's last
  answer (with an Age header) stands in for it up to HEALTH_MAX_AGE_S: health checks never queue
  behind generation, and a replica that stops answering is reported within that time.

The settings are per deployment (`serving_deployment`'s config): the deploy publishes them in Ray's
GCS key-value store and every proxy reads them within SETTINGS_REFRESH_S; every response carries
the digest of the settings in force (ADMISSION_HEADER), which the deploy waits for. Each proxy
(one per node) counts its own requests: behind a load balancer over N nodes a client gets up to N
times a cap.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import ipaddress
import json
import logging
import math
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields

from llmops_dagster.serving import openai_api

MIB = 1024 * 1024
CALLBACK_IMPORT_PATH = "llmops_dagster.serving.admission:proxy_middlewares"
# The environment every Ray node's `ray start` needs, read when its Serve proxy starts.
PROXY_ENV = {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": CALLBACK_IMPORT_PATH,
             "FORWARDED_ALLOW_IPS": ""}
ADMISSION_HEADER = "x-llmops-admission"  # digest of the admission settings in force at this proxy
KV_NAMESPACE = "llmops"
KV_KEY = b"serving_admission"
SETTINGS_REFRESH_S = 2.0  # how stale a proxy's copy of the published settings may be
HEALTH_FRESH_S = 1.0  # a replica's /healthz answer younger than this is answered from the proxy
HEALTH_MAX_AGE_S = 30.0  # a busy replica's last answer stands in for it this long, then 503
HEALTH_PATH = "/healthz"
RETRY_AFTER_S = 1  # in-flight caps free up as fast as requests finish

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdmissionSettings:
    """The proxy's limits; metadata "bounds" are checked when the settings are made."""

    max_body_bytes: int = field(default=2 * MIB, metadata={
        "bounds": (1024, 64 * MIB),
        "help": "Largest request body in bytes (by Content-Length, or counted while reading); over "
        "it: 413, the rest unread. The largest valid /v1/generate body is about 0.8 MB (32 turns "
        "of 2000 characters, each JSON-escaped to up to 12 bytes)."})
    body_timeout_s: float = field(default=10.0, metadata={
        "bounds": (0.5, 300.0),
        "help": "Time a client has to send the whole body once its headers arrived (s); over it: "
        "408. The proxy reads the body before a replica is asked, so a slow body holds no replica."})
    max_concurrent_per_address: int = field(default=16, metadata={
        "bounds": (1, 4096),
        "help": "Requests without an API key in flight at once from one client host (all of "
        "127.0.0.0/8 is one host, IPv6 counts by /64); over it: 429 with Retry-After."})
    max_concurrent_per_key: int = field(default=16, metadata={
        "bounds": (1, 4096),
        "help": "Requests in flight at once with one bearer key; over it: 429 with Retry-After."})
    max_concurrent_keyed_per_address: int = field(default=64, metadata={
        "bounds": (1, 4096),
        "help": "Requests with any bearer key in flight at once from one client host: bounds what "
        "invented keys can hold, apart from the keyless budget of the same host."})
    health_wait_s: float = field(default=0.5, metadata={
        "bounds": (0.05, 10.0),
        "help": "How long GET /healthz waits for a busy replica before it answers with the "
        "replicas' last answer (an Age header says how old) (s)."})
    trusted_proxies: str = field(default="", metadata={
        "help": "Comma-separated addresses or networks (CIDR) of reverse proxies whose "
        "X-Forwarded-For is believed; empty: the header is ignored and the TCP peer is the client."})

    def __post_init__(self):
        for setting in fields(self):
            value, bounds = getattr(self, setting.name), setting.metadata.get("bounds")
            if bounds is None:
                continue
            low, high = bounds
            if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
                raise ValueError(f"{setting.name} must be a number from {low} to {high}, got {value!r}")
        trusted_networks(self.trusted_proxies)

    @functools.lru_cache(maxsize=16)  # noqa: B019 - a few frozen settings objects per process
    def digest(self, forwarded_allow_ips: str = "") -> str:
        """What ADMISSION_HEADER carries: these settings, and the proxy's FORWARDED_ALLOW_IPS
        (uvicorn's own trust in X-Forwarded-For, which must be empty)."""
        text = json.dumps({**asdict(self), "FORWARDED_ALLOW_IPS": forwarded_allow_ips}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=16)
def trusted_networks(text: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """The networks of a `trusted_proxies` setting; ValueError naming a bad entry."""
    networks = []
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise ValueError(f"trusted_proxies: {entry!r} is not an IP address or network") from None
    return tuple(networks)


def _ip(text: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address in `text` (bare, host:port, [v6]:port), IPv4-mapped IPv6 as IPv4; None if none."""
    if not text:
        return None
    text = text.strip()
    if text.startswith("["):
        text = text[1:text.find("]")] if "]" in text else text
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    return ip.ipv4_mapped if ip.version == 6 and ip.ipv4_mapped else ip


def budget_host(address: str | None) -> str:
    """The host whose budgets a client address spends: every loopback address is one host (any
    127.0.0.0/8 source can be bound by a local user), an IPv6 address counts by its /64 (one
    site's allocation), an IPv4 address by itself; what is not an address, by its text."""
    ip = _ip(address)
    if ip is None:
        return address or "unknown"
    if ip.is_loopback:
        return "loopback"
    if ip.version == 6:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def forwarded_client(peer: str | None, forwarded_for: list[str], trusted: tuple) -> str | None:
    """The client address of a request from `peer`: the peer itself, unless it is a trusted
    proxy; then the nearest X-Forwarded-For hop that is not a trusted proxy (each proxy appends
    the address it saw, so hops right of it were written by trusted proxies). A hop that is not
    an address leaves the peer as the client."""
    ip = _ip(peer)
    if ip is None or not any(ip in network for network in trusted):
        return peer
    hops = [hop.strip() for value in forwarded_for for hop in value.split(",") if hop.strip()]
    for hop in reversed(hops):
        hop_ip = _ip(hop)
        if hop_ip is None:
            return peer
        if not any(hop_ip in network for network in trusted):
            return str(hop_ip)
    return str(_ip(hops[0])) if hops else peer


def bearer_identity(headers: list[tuple[bytes, bytes]]) -> str | None:
    """A hash of the request's bearer key (its concurrency identity), None without one."""
    for name, value in headers:
        if name == b"authorization":
            scheme, _, key = value.partition(b" ")
            if scheme.lower() == b"bearer" and key.strip():
                return hashlib.sha256(key.strip()).hexdigest()[:32]
    return None


def publish(settings: AdmissionSettings) -> None:
    """Make `settings` the ones every proxy of the connected cluster applies (within
    SETTINGS_REFRESH_S)."""
    from ray.experimental import internal_kv

    internal_kv._internal_kv_put(KV_KEY, json.dumps(asdict(settings)).encode(), overwrite=True,
                                 namespace=KV_NAMESPACE)


def _published() -> AdmissionSettings | None:
    from ray.experimental import internal_kv

    value = internal_kv._internal_kv_get(KV_KEY, namespace=KV_NAMESPACE)
    return AdmissionSettings(**json.loads(value)) if value else None


def drain_bytes(settings: AdmissionSettings) -> int:
    """The largest oversized body read (and dropped) before its 413: 4 times the cap, at least
    8 MiB (1 MB of text sent as \\u0000 escapes is 6 MB: its sender still reads the 413)."""
    return max(8 * MIB, 4 * settings.max_body_bytes)


def proxy_middlewares() -> list:
    """What RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH names: called once by each Serve proxy."""
    from starlette.middleware import Middleware

    return [Middleware(AdmissionMiddleware)]


def _json_response(status: int, detail: str, headers: list[tuple[bytes, bytes]] = (),
                   path: str = "") -> tuple:
    """(status, headers, body) of a refusal: {"detail": ...}, and on the OpenAI routes also the
    OpenAI error object {"error": {message, type, param, code}} its clients read."""
    refusal = {"detail": detail}
    if openai_api.is_openai_path(path):
        refusal |= openai_api.error_body(status, detail)
    body = json.dumps(refusal).encode()
    return status, [(b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()), *headers], body


class AdmissionMiddleware:
    """The pure ASGI middleware of the module docstring; one per proxy, with its in-flight counts."""

    def __init__(self, app, settings: AdmissionSettings | None = None, fetch=_published):
        self.app = app
        self.settings = settings or AdmissionSettings()
        self._fetch = fetch  # where published settings come from (None: keep `settings`)
        self._fetched_at = -math.inf
        self._refresh: asyncio.Task | None = None
        self._in_flight: Counter[tuple[str, str]] = Counter()
        self._health: tuple[float, int, list, bytes] | None = None  # (monotonic, status, headers, body)
        self._health_task: asyncio.Task | None = None

    # ------------------------------------------------------------------ settings

    def _refresh_settings(self) -> None:
        if self._fetch is None or time.monotonic() - self._fetched_at < SETTINGS_REFRESH_S:
            return
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.create_task(self._load_settings())

    async def _load_settings(self) -> None:
        try:
            published = await asyncio.to_thread(self._fetch)
        except Exception:  # noqa: BLE001 - keep the settings in force; the next request retries
            logger.exception("could not read the published admission settings")
            return
        finally:
            self._fetched_at = time.monotonic()
        if published is not None:
            self.settings = published

    # ------------------------------------------------------------------ requests

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        self._refresh_settings()
        settings = self.settings
        trusted = trusted_networks(settings.trusted_proxies)
        digest = settings.digest(os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1,::1"))

        async def send_marked(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()),
                                                   (ADMISSION_HEADER.encode(), digest.encode())]}
            await send(message)

        peer = scope.get("client")
        if trusted and peer:
            forwarded = [v.decode("latin-1") for n, v in scope["headers"] if n == b"x-forwarded-for"]
            client = forwarded_client(peer[0], forwarded, trusted)
            if client != peer[0]:
                scope = {**scope, "client": (client, 0)}
        path = scope.get("path", "")
        if path.startswith("/-/"):  # Serve's own routes and health (no replica, no body)
            return await self.app(scope, receive, send_marked)
        if path == HEALTH_PATH and scope.get("method") == "GET":
            return await self._answer_health(scope, send_marked, settings)

        host = budget_host(scope["client"][0] if scope.get("client") else None)
        key = bearer_identity(scope["headers"])
        claims = ([(("address", host), settings.max_concurrent_per_address)] if key is None else
                  [(("key", key), settings.max_concurrent_per_key),
                   (("keyed-address", host), settings.max_concurrent_keyed_per_address)])
        over = [(identity, cap) for identity, cap in claims if self._in_flight[identity] >= cap]
        if over:
            (budget, _), cap = over[0]
            what = {"address": "per client address", "key": "per API key",
                    "keyed-address": "with API keys per client address"}[budget]
            # Connection: close, as the body is left unread.
            return await self._reply(send_marked, *_json_response(
                429, f"too many requests in flight {what} (at most {cap}); retry after "
                     f"{RETRY_AFTER_S} s", [(b"retry-after", str(RETRY_AFTER_S).encode()),
                                           (b"connection", b"close")], path))
        for identity, _ in claims:
            self._in_flight[identity] += 1
        try:
            await self._forward(scope, receive, send_marked, settings)
        finally:
            for identity, _ in claims:
                self._in_flight[identity] -= 1
                if self._in_flight[identity] <= 0:
                    del self._in_flight[identity]

    async def _forward(self, scope, receive, send, settings: AdmissionSettings) -> None:
        """Read the whole body within the deadline, then hand the request on with it. An oversized
        body up to `drain_bytes(settings)` is read and dropped before the 413, so that a client
        that sends its whole body before reading the answer gets the 413, not a connection reset;
        a larger one gets the 413 at once and the connection is closed, the rest unread."""
        limit, drain = settings.max_body_bytes, drain_bytes(settings)
        path = scope.get("path", "")
        declared = None
        for name, value in scope["headers"]:
            if name == b"content-length":
                if not value.strip().isdigit():
                    return await self._reply(send, *_json_response(
                        400, "Content-Length must be a whole number of bytes", [(b"connection", b"close")],
                        path))
                declared = int(value)
        too_large = _json_response(413, f"the body exceeds {limit} bytes, the most accepted", path=path)
        if declared is not None and declared > drain:
            return await self._reply(send, *_json_response(
                413, f"the body is {declared} bytes; at most {limit} are accepted",
                [(b"connection", b"close")], path))
        chunks, size = [], 0
        try:
            async with asyncio.timeout(settings.body_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return  # the client left: nothing to answer
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > drain:
                        status, headers, body = too_large
                        return await self._reply(send, status, [*headers, (b"connection", b"close")], body)
                    if size <= limit:
                        chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            return await self._reply(send, *_json_response(
                413 if size > limit else 408,
                f"the body exceeds {limit} bytes, the most accepted" if size > limit else
                f"the body did not arrive within {settings.body_timeout_s:g} s", [(b"connection", b"close")],
                path))
        if size > limit:
            return await self._reply(send, *too_large)
        body = b"".join(chunks)
        delivered = False

        async def replay():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # waits for the client to disconnect

        await self.app(scope, replay, send)

    @staticmethod
    async def _reply(send, status: int, headers: list, body: bytes) -> None:
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    # ------------------------------------------------------------------ health

    async def _answer_health(self, scope, send, settings: AdmissionSettings) -> None:
        cached = self._health
        if cached is None or time.monotonic() - cached[0] >= HEALTH_FRESH_S:
            if self._health_task is None or self._health_task.done():
                self._health_task = asyncio.create_task(self._ask_replica(scope))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._health_task), settings.health_wait_s)
            if self._health_task.done():
                status, headers, body = self._health_task.result()
                if status != 503 or self._health is None:  # 503: Serve's queue is full (busy)
                    return await self._reply(send, status, headers, body)
            cached = self._health  # a busy replica: its last answer stands in for it, for a while
            if cached is None or time.monotonic() - cached[0] > HEALTH_MAX_AGE_S:
                return await self._reply(send, *_json_response(
                    503, "no replica answered the health check in time; retry",
                    [(b"retry-after", str(RETRY_AFTER_S).encode())]))
        age = int(time.monotonic() - cached[0])
        await self._reply(send, cached[1], [*cached[2], (b"age", str(age).encode())], cached[3])

    async def _ask_replica(self, scope) -> tuple[int, list, bytes]:
        """A replica's answer to GET /healthz (status, headers, body); a 200 is kept for reuse."""
        finished = asyncio.Event()
        started: dict = {}
        parts: list[bytes] = []
        asked = False

        async def receive():
            nonlocal asked
            if not asked:
                asked = True
                return {"type": "http.request", "body": b"", "more_body": False}
            await finished.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            if message["type"] == "http.response.start":
                started.update(message)
            elif message["type"] == "http.response.body":
                parts.append(message.get("body", b""))
                if not message.get("more_body", False):
                    finished.set()

        request = {**scope, "method": "GET", "path": HEALTH_PATH, "raw_path": HEALTH_PATH.encode(),
                   "query_string": b"",
                   "headers": [(n, v) for n, v in scope["headers"] if n in (b"host", b"user-agent")]}
        try:
            await self.app(request, receive, send)
        except Exception:  # noqa: BLE001 - reported as no answer; the next check asks again
            logger.exception("the health check could not be forwarded")
        finally:
            finished.set()
        status = started.get("status", 503)
        # Per-request headers are not repeated on answers from the cache.
        headers = [(n, v) for n, v in started.get("headers", ()) if n.lower() not in (b"x-request-id",
                                                                                    b"date")]
        body = b"".join(parts)
        if status == 200:
            self._health = (time.monotonic(), status, headers, body)
        return status, headers, body

"""Rate limits of the serving API, per API key and per client host, with the `limits` library.

Each endpoint has one limit (e.g. "120/minute"). A request whose bearer key authenticates spends
its key's budget only, wherever it comes from; every other request (no key, or a key that is
unknown or revoked) spends its client host's budget, so invented bearer strings cannot mint
budgets. Hosts are as admission.budget_host makes them (all of loopback is one, IPv6 by /64), from
the client address the proxy's admission resolved (X-Forwarded-For only from a trusted proxy).
A moving window (the `limits` library's MovingWindowRateLimiter, in memory) is exact: no burst of
twice the limit across a window edge. The counters live in each replica's memory, so with N
replicas a caller whose requests spread over them gets up to N times the limit; a shared store
(`limits` supports Redis) makes it exact across replicas.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from limits import parse
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter


@dataclass(frozen=True)
class Refusal:
    """A request over its limit: which budget it exceeded, and when to try again (whole seconds)."""

    budget: str  # "key" or "address"
    limit: str
    retry_after_s: int


class RateLimits:
    """Limits by endpoint name ("generate", "feedback", ...): each a `limits` string like "60/minute"."""

    def __init__(self, per_endpoint: dict[str, str]):
        self._limits = {name: parse(text) for name, text in per_endpoint.items()}
        self._texts = dict(per_endpoint)
        self._limiter = MovingWindowRateLimiter(MemoryStorage())

    def check(self, endpoint: str, budget: str, identity: str) -> Refusal | None:
        """Count one request of `endpoint` against `budget` ("key": a key id; "address": a client
        host); a Refusal when that budget is spent."""
        limit = self._limits.get(endpoint)
        if limit is None:
            return None
        identifier = f"{endpoint}|{budget}|{identity}"
        if not self._limiter.hit(limit, identifier):
            reset = self._limiter.get_window_stats(limit, identifier).reset_time
            return Refusal(budget, self._texts[endpoint], max(1, math.ceil(reset - time.time())))
        return None

"""Rate limits of the serving API, per API key and per source address, with the `limits` library.

Each endpoint has one limit (e.g. "120/minute"), applied separately to every key and every source
address: a client with a key cannot exceed it by changing address, and callers without a key share
their address's budget. A moving window (the `limits` library's MovingWindowRateLimiter, in
memory) is exact: no burst of twice the limit across a window edge. The counters live in each
replica's memory, so with N replicas a caller whose requests spread over them gets up to N times
the limit; a shared store (`limits` supports Redis) makes it exact across replicas.
"""

from __future__ import annotations

import hashlib
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

    def check(self, endpoint: str, address: str | None, bearer: str | None) -> Refusal | None:
        """Count one request of `endpoint`; a Refusal when its key's or address's budget is spent.
        The key's budget is keyed by a hash of the bearer as sent, so a flood of wrong keys is
        limited too, before any database lookup."""
        limit = self._limits.get(endpoint)
        if limit is None:
            return None
        budgets = [("address", f"{endpoint}|address|{address or 'unknown'}")]
        if bearer:
            budgets.append(("key", f"{endpoint}|key|{hashlib.sha256(bearer.encode()).hexdigest()}"))
        for budget, identifier in budgets:
            if not self._limiter.hit(limit, identifier):
                reset = self._limiter.get_window_stats(limit, identifier).reset_time
                return Refusal(budget, self._texts[endpoint], max(1, math.ceil(reset - time.time())))
        return None

"""The tests' traffic generator: requests at a fixed rate from a few threads, while a test breaks
something, with every outcome kept beside the time it was sent. Not a test module (no test_ prefix)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class Traffic:
    """`one(number)` sends request `number` and returns its outcome as a dict (it must not raise: a
    failure is an outcome). `workers` threads share `rate_per_s`, thread k sending numbers k,
    k + workers, ...; each outcome gets `at` (sent) and `done` (answered), monotonic seconds.
    Stopping waits until `min_requests` were sent; `max_requests` bounds a test whose fault hangs."""

    def __init__(self, one: Callable[[int], dict], rate_per_s: float = 20, workers: int = 4,
                 min_requests: int = 0, max_requests: int = 100_000):
        self.one, self.rate_per_s, self.workers = one, rate_per_s, workers
        self.min_requests, self.max_requests = min_requests, max_requests
        self.outcomes: list[dict] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(workers)]

    def _run(self, offset: int) -> None:
        number = offset
        while number < self.max_requests and (number < self.min_requests or not self.stop.is_set()):
            started = time.monotonic()
            outcome = self.one(number)
            with self.lock:
                self.outcomes.append({"at": started, "done": time.monotonic(), **outcome})
            number += self.workers
            time.sleep(max(0.0, self.workers / self.rate_per_s - (time.monotonic() - started)))

    def start(self) -> Traffic:
        for thread in self.threads:
            thread.start()
        return self

    def finish(self, timeout_s: float = 600) -> list[dict]:
        """Stop (once `min_requests` were sent) and return the outcomes in the order sent."""
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=timeout_s)
        self.outcomes.sort(key=lambda outcome: outcome["at"])
        return self.outcomes

    def __enter__(self) -> Traffic:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.finish()

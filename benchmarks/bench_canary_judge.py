"""The canary judge on simulated canaries: decision rates and candidate ratings to a decision.

Champion negative rate 0.2; each counted rating goes to the candidate with chance 0.1; the judge
looks after every counted rating, default settings; 200 runs per scenario (seeded), each until a
decision or 2000 candidate ratings. Scenarios: candidate 0.3 (regression), 0.2 (A/A), 0.1
(improvement). Goals, from the canary issue: the regression aborted within 400 candidate ratings
in at least 95% of runs, A/A wrongly aborted or promoted as better in at most 5%, the improvement
promoted in at least 95%.

    python benchmarks/bench_canary_judge.py
"""

import time

import numpy as np
from results import record

from llmops_dagster.loop.canary_judge import ABORT, CONTINUE, PROMOTE, ArmCounts, decisions, judge

CHAMPION_RATE = 0.2
CANDIDATE_SHARE = 0.1
RUNS = 200
MAX_CANDIDATE_RATINGS = 2000
CHUNK = 2000  # ratings per step of the vectorized loop
SEED = 20261203


def simulate(candidate_rate: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per run: the decision code, the candidate ratings at it (-1 when none) and 'better'."""
    decision, at, better = np.full(RUNS, CONTINUE, np.int8), np.full(RUNS, -1), np.zeros(RUNS, bool)
    counts = np.zeros((RUNS, 4), np.int64)  # champion ratings, negatives, candidate ratings, negatives
    active = np.arange(RUNS)
    while len(active):
        to_candidate = rng.random((len(active), CHUNK)) < CANDIDATE_SHARE
        negative = rng.random((len(active), CHUNK)) < np.where(to_candidate, candidate_rate, CHAMPION_RATE)
        start = counts[active]
        paths = [start[:, i:i + 1] + np.cumsum(step, axis=1) for i, step in enumerate(
            (~to_candidate, negative & ~to_candidate, to_candidate, negative & to_candidate))]
        codes = decisions(*paths)
        codes[paths[2] > MAX_CANDIDATE_RATINGS] = CONTINUE
        decided = codes != CONTINUE
        first = decided.argmax(axis=1)
        for row in np.flatnonzero(decided.any(axis=1)):
            n1, k1, n2, k2 = (int(path[row, first[row]]) for path in paths)
            run = active[row]
            decision[run], at[run] = codes[row, first[row]], n2
            better[run] = judge(ArmCounts(n1, k1), ArmCounts(n2, k2)).better
        counts[active] = np.stack([path[:, -1] for path in paths], axis=1)
        active = active[~decided.any(axis=1) & (paths[2][:, -1] < MAX_CANDIDATE_RATINGS)]
    return decision, at, better


def main() -> None:
    scenarios = (("regression", 0.3), ("A/A", 0.2), ("improvement", 0.1))
    rngs = [np.random.default_rng(child) for child in np.random.SeedSequence(SEED).spawn(len(scenarios))]
    for (name, rate), rng in zip(scenarios, rngs, strict=True):
        started = time.perf_counter()
        decision, at, better = simulate(rate, rng)
        seconds = time.perf_counter() - started
        aborted, promoted = decision == ABORT, decision == PROMOTE
        median = float(np.median(at[decision != CONTINUE])) if (decision != CONTINUE).any() else float("nan")
        print(f"{name} (candidate {rate}): aborted {aborted.mean():.1%} "
              f"({(aborted & (at <= 400)).mean():.1%} within 400 candidate ratings), "
              f"promoted {promoted.mean():.1%} (as better {(promoted & better).mean():.1%}), "
              f"undecided {(decision == CONTINUE).mean():.1%}; median candidate ratings to a decision "
              f"{median:.0f}; {seconds:.1f} s")
        record("canary_judge", f"{name}: median candidate ratings to a decision", median, "ratings", "", None)
        if name == "regression":
            rate_in_time = float((aborted & (at <= 400)).mean())
            record("canary_judge", "regression +0.1 aborted within 400 candidate ratings", rate_in_time, "",
                   "at least 0.95", rate_in_time >= 0.95)
        elif name == "A/A":
            wrong = float((aborted | (promoted & better)).mean())
            record("canary_judge", "A/A wrongly aborted or promoted as better", wrong, "", "at most 0.05",
                   wrong <= 0.05)
        else:
            record("canary_judge", "improvement -0.1 promoted within 2000 candidate ratings",
                   float(promoted.mean()), "", "at least 0.95", bool(promoted.mean() >= 0.95))


if __name__ == "__main__":
    main()

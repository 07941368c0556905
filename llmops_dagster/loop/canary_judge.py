"""The canary judge: is the candidate's negative-rating rate worse than the champion's, by tests
that stay valid however often a sensor looks at the counts (optional stopping)?

Each counted rating (one per actor) is a Bernoulli outcome, 1 when negative, for the arm that
served the answer. Rates are fractions of counted ratings (0.2 = 20 points); d is the candidate's
rate minus the champion's.

Method: one-sided mixture sequential probability ratio tests (mSPRT, Johari et al., "Always valid
inference", 2017/2022) of H0: d = theta0 with a normal approximation, mixing over alternatives on
one side with a half-normal of scale tau (Howard et al. 2021, "Time-uniform, nonparametric,
nonasymptotic confidence sequences", one-sided normal mixture). With n the counted ratings of an
arm, d_hat the difference of observed rates, V(theta0) its variance under H0 (rate^2, below) and
z = (d_hat - theta0) / sqrt(V) (standard errors):

    r    = tau2 / V                                   (mixture variance over the variance, no unit)
    M    = 2 / sqrt(1 + r) * exp(z^2 r / (2 (1 + r))) * Phi(z sqrt(r / (1 + r)))
    reject H0 on the upper side when M >= 1 / alpha_side, i.e. z >= c(r, alpha_side)

M is the half-normal mixture of likelihood ratios exp(theta S - theta^2 I / 2) (S = (d_hat -
theta0) / V, I = 1 / V), a nonnegative martingale under H0 for a Gaussian martingale, so by Ville's
inequality it ever reaches 1 / alpha_side with probability at most alpha_side: valid at every look
at once, however often the sensor looks, over the whole canary. Why this and not a repeated
z-test: a z-test at 1.96 repeated every 15 s aborts an A/A canary far more often than 5%; the
critical value c here grows only like sqrt(ln n). Why tests at chosen theta0 and not one
symmetric interval: the two errors cost differently (below), so alpha is split between the sides.

V(theta0) = p2 (1 - p2) / n2 + p1 (1 - p1) / n1 with the rates re-centred to differ by theta0
around the overall rate p = (negatives + 1) / (ratings + 2) of both arms together (add-one so that
no negatives yet does not mean zero variance): p1 = p - theta0 n2 / N, p2 = p + theta0 n1 / N.
At theta0 = 0 that is the pooled variance of the two-proportion score test; a variance under the
null, not the observed rates', gives the test its level and, when the small arm is the worse one,
more power. The normal approximation makes the guarantee asymptotic; the simulation in
tests/test_canary_judge.py checks it on Bernoulli ratings at the sizes a canary sees.

Decision rule, in this order:
- either arm below `min_ratings_per_arm`: continue;
- abort when H0: d = max_negative_rate_gap is rejected upwards at alpha * abort_share (the
  candidate is confidently worse by more than the gap);
- promote when H0: d = promote_tolerance is rejected downwards at alpha * (1 - abort_share) (the
  candidate is confidently not worse by more than the tolerance); it is "better" when H0: d = 0 is
  rejected downwards at that level too;
- else continue.
An A/A canary (d = 0) is wrongly aborted with probability at most alpha * abort_share and promoted
as better at most alpha * (1 - abort_share): at most alpha in all, however often it is judged. It
may legitimately end promoted as "not worse". The default split (0.8) spends most of alpha where
power is needed, on catching a regression within a few hundred candidate ratings, and keeps the
promote side strict: a candidate worse by the tolerance is promoted at most 1% of the time.
The interval in a Verdict is the set of differences that neither side rejects, an always-valid
(1 - alpha) confidence sequence for d.

Measured (tests/test_canary_judge.py: 5 batches of 200 runs per scenario, champion rate 0.2,
candidate share 10% of ratings, judged after every counted rating, default settings; medians from
benchmarks/bench_canary_judge.py, 200 runs):
- candidate 0.3: aborted within 400 candidate ratings in 97.6% of runs (batches 96.5% to 98.5%);
  median 120 candidate ratings to the abort;
- candidate 0.2 (A/A, each run up to 2000 candidate ratings): aborted 2.7% (batches 1.5% to 4.0%),
  promoted as better 0.0%, so wrong 2.7%; promoted as not worse 16.9%; undecided 80.4%;
- candidate 0.1: promoted in 100% of runs, median 138 candidate ratings, labelled "not worse":
  the test at the tolerance (H0: d = +0.02) rejects before the one at 0 does, and a canary ends
  at its first decision, so "better" is rare on this path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import numpy as np
from scipy.optimize import brentq
from scipy.special import erfc

CONTINUE, PROMOTE, ABORT = 0, 1, -1
DECISIONS = {CONTINUE: "continue", PROMOTE: "promote", ABORT: "abort"}


@dataclass(frozen=True)
class ArmCounts:
    """Counted ratings of one arm (champion or candidate) and how many of them were negative."""

    ratings: int
    negative: int

    def __post_init__(self) -> None:
        if self.ratings < 0:
            raise ValueError(f"ratings must be non-negative, got {self.ratings}")
        if not 0 <= self.negative <= self.ratings:
            raise ValueError(f"negative must be between 0 and ratings ({self.ratings}), got {self.negative}")

    @property
    def negative_rate(self) -> float:
        return self.negative / self.ratings if self.ratings else 0.0


@dataclass(frozen=True)
class JudgeSettings:
    alpha: float = field(default=0.05, metadata={"help": (
        "Chance that an A/A canary (candidate exactly as good as the champion) is ever wrongly "
        "aborted or promoted as better, over the whole canary however often it is judged.")})
    abort_share: float = field(default=0.8, metadata={"help": (
        "Share of alpha spent on wrong aborts; the rest bounds wrong promotions (as better, or of "
        "a candidate worse by the tolerance). 0.8: 4% and 1% at alpha 0.05.")})
    min_ratings_per_arm: int = field(default=30, metadata={"help": (
        "Counted ratings each arm needs before any decision; below it the normal approximation "
        "of a rate is poor.")})
    mixture_variance: float = field(default=0.005, metadata={"help": (
        "tau2 of the half-normal mixture over differences, in rate^2 (0.005: gaps of about 7 "
        "points). A test is sharpest when the difference's variance is about tau2 / 7 (standard "
        "error 0.027: about 250 candidate ratings at a 10% share and a 0.2 rate); a larger tau2 "
        "decides big gaps sooner and small ones later. Of 0.0025, 0.005, 0.01 and 0.02, 0.005 "
        "aborted a 10-point regression within 400 candidate ratings most often in simulation.")})
    max_negative_rate_gap: float = field(default=0.0, metadata={"help": (
        "The candidate is aborted when it is confidently worse than the champion by more than "
        "this (rate, 0.01 = 1 point).")})
    promote_tolerance: float = field(default=0.02, metadata={"help": (
        "The candidate is promoted when it is confidently not worse than the champion by this "
        "much (rate); 'better' when it is confidently below the champion.")})

    def __post_init__(self) -> None:
        for name in ("alpha", "abort_share"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {getattr(self, name)}")
        if self.min_ratings_per_arm < 1:
            raise ValueError(f"min_ratings_per_arm must be at least 1, got {self.min_ratings_per_arm}")
        if not 0.0 < self.mixture_variance <= 1.0:
            raise ValueError(f"mixture_variance must be in (0, 1], got {self.mixture_variance}")
        for name in ("max_negative_rate_gap", "promote_tolerance"):
            if not 0.0 <= getattr(self, name) < 0.5:
                raise ValueError(f"{name} must be in [0, 0.5), got {getattr(self, name)}")

    @property
    def abort_alpha(self) -> float:
        return self.alpha * self.abort_share

    @property
    def promote_alpha(self) -> float:
        return self.alpha * (1.0 - self.abort_share)

    @classmethod
    def help(cls) -> dict[str, str]:
        """Each setting's description, for a Dagster config or a page."""
        return {f.name: f.metadata["help"] for f in fields(cls)}


@dataclass(frozen=True)
class Verdict:
    decision: str  # "promote", "abort" or "continue"
    statistic: float  # z of the deciding test (on continue, of the test nearer its threshold)
    threshold: float  # that test's always-valid critical value in standard errors
    difference: float  # candidate minus champion negative rate
    interval: tuple[float, float]  # always-valid (1 - alpha) interval of the difference; (-1, 1) below min
    better: bool  # a promote with the candidate confidently below the champion (else "not worse")
    reason: str  # one sentence with the figures, for a sensor's SkipReason or a run's metadata


def null_variance(champion_ratings, champion_negative, candidate_ratings, candidate_negative,
                  theta0) -> np.ndarray:
    """Variance (rate^2) of the estimated difference if the true difference were theta0."""
    n1, n2 = np.asarray(champion_ratings, float), np.asarray(candidate_ratings, float)
    total = n1 + n2
    overall = (np.asarray(champion_negative, float) + np.asarray(candidate_negative, float) + 1) / (total + 2)
    p1 = np.clip(overall - theta0 * n2 / total, 1e-3, 1 - 1e-3)
    p2 = np.clip(overall + theta0 * n1 / total, 1e-3, 1 - 1e-3)
    return p2 * (1 - p2) / n2 + p1 * (1 - p1) / n1


def critical_value(variance, tau2: float, alpha: float) -> np.ndarray:
    """The z at which the one-sided half-normal mixture reaches 1 / alpha (module docstring).

    Solves z = sqrt(2 (ln(1/alpha) - ln 2 + ln(1 + r) / 2 - ln Phi(z s))) / s, s = sqrt(r / (1 + r)),
    by fixed-point steps from ln Phi = 0: the right side falls as z grows, so the iterates alternate
    around the root and an odd number of steps ends at or above it (conservative)."""
    r = tau2 / np.asarray(variance, float)
    s = np.sqrt(r / (1 + r))
    base = math.log(1 / alpha) - math.log(2) + 0.5 * np.log1p(r)
    z = np.sqrt(2 * base) / s
    for _ in range(3):
        log_phi = np.log1p(-0.5 * erfc(z * s / math.sqrt(2)))  # ln Phi(z s), z s > 0
        z = np.sqrt(2 * (base - log_phi)) / s
    return z


def _rejects(counts, theta0: float, alpha: float, tau2: float, upper: bool) -> tuple[np.ndarray, np.ndarray]:
    """z of (difference - theta0) under H0: d = theta0, signed so that rejecting means z >= c; and c."""
    n1, k1, n2, k2 = counts
    variance = null_variance(n1, k1, n2, k2, theta0)
    z = (k2 / n2 - k1 / n1 - theta0) / np.sqrt(variance)
    return (z if upper else -z), critical_value(variance, tau2, alpha)


def decisions(champion_ratings, champion_negative, candidate_ratings, candidate_negative,
              settings: JudgeSettings = JudgeSettings()) -> np.ndarray:
    """The decision at each look as PROMOTE, ABORT or CONTINUE, elementwise over arrays of counts
    (a whole sequence of looks at once)."""
    n1, n2 = np.asarray(champion_ratings, float), np.asarray(candidate_ratings, float)
    enough = (n1 >= settings.min_ratings_per_arm) & (n2 >= settings.min_ratings_per_arm)
    counts = (np.maximum(n1, 1), np.asarray(champion_negative, float), np.maximum(n2, 1),
              np.asarray(candidate_negative, float))
    z, c = _rejects(counts, settings.max_negative_rate_gap, settings.abort_alpha, settings.mixture_variance,
                    upper=True)
    abort = enough & (z >= c)
    z, c = _rejects(counts, settings.promote_tolerance, settings.promote_alpha, settings.mixture_variance,
                    upper=False)
    promote = enough & ~abort & (z >= c)
    return np.where(abort, ABORT, np.where(promote, PROMOTE, CONTINUE)).astype(np.int8)


def _bound(counts, settings: JudgeSettings, upper: bool) -> float:
    """The always-valid bound: the edge of the differences that this side's test does not reject."""
    alpha = settings.promote_alpha if upper else settings.abort_alpha
    difference = counts[3] / counts[2] - counts[1] / counts[0]

    def margin(theta0: float) -> float:  # > 0 where H0: d = theta0 is rejected
        z, c = _rejects(counts, theta0, alpha, settings.mixture_variance, upper=not upper)
        return float(z - c)

    edge = 1.0 if upper else -1.0
    if margin(edge) <= 0:
        return edge
    return brentq(margin, difference, edge) if upper else brentq(margin, edge, difference)


def judge(champion: ArmCounts, candidate: ArmCounts, settings: JudgeSettings = JudgeSettings()) -> Verdict:
    """Promote, abort or continue the canary from the counted ratings of both arms."""
    difference = candidate.negative_rate - champion.negative_rate
    rates = (f"candidate negative rate {candidate.negative_rate:.3f} "
             f"({candidate.negative}/{candidate.ratings}) vs champion {champion.negative_rate:.3f} "
             f"({champion.negative}/{champion.ratings})")
    missing = {name: settings.min_ratings_per_arm - arm.ratings
               for name, arm in (("champion", champion), ("candidate", candidate))
               if arm.ratings < settings.min_ratings_per_arm}
    if missing:
        needs = " and ".join(f"the {name} needs {count} more" for name, count in missing.items())
        return Verdict(decision="continue", better=False, statistic=0.0, threshold=math.inf,
                       difference=difference, interval=(-1.0, 1.0),
                       reason=(f"continue: {needs} counted ratings to reach {settings.min_ratings_per_arm} "
                               f"per arm; {rates}."))
    counts = (float(champion.ratings), float(champion.negative), float(candidate.ratings),
              float(candidate.negative))
    code = int(decisions(*counts, settings))
    tests = {  # name: (z, c) signed so that the test decides when z >= c
        "abort": _rejects(counts, settings.max_negative_rate_gap, settings.abort_alpha,
                          settings.mixture_variance, upper=True),
        "promote": _rejects(counts, settings.promote_tolerance, settings.promote_alpha,
                            settings.mixture_variance, upper=False),
    }
    z_better, c_better = _rejects(counts, 0.0, settings.promote_alpha, settings.mixture_variance, upper=False)
    better = code == PROMOTE and bool(z_better >= c_better)
    if code == CONTINUE:
        deciding = max(tests, key=lambda name: float(tests[name][0] - tests[name][1]))
    else:
        deciding = DECISIONS[code]
    statistic, threshold = (float(x) for x in tests[deciding])
    lower, upper = _bound(counts, settings, upper=False), _bound(counts, settings, upper=True)
    figures = (f"{rates}; difference {difference:+.3f}, always-valid {1 - settings.alpha:.0%} interval "
               f"[{lower:+.3f}, {upper:+.3f}], {deciding} test z {statistic:.2f} vs {threshold:.2f}")
    if code == ABORT:
        reason = f"abort: {figures}: worse by more than the allowed gap {settings.max_negative_rate_gap:.3f}."
    elif better:
        reason = f"promote (better): {figures}: the candidate's negative rate is confidently lower."
    elif code == PROMOTE:
        reason = (f"promote (not worse): {figures}: not worse by the tolerance "
                  f"{settings.promote_tolerance:.3f}.")
    else:
        reason = (f"continue: {figures}: not yet confidently worse by more than "
                  f"{settings.max_negative_rate_gap:.3f}, nor confidently not worse by "
                  f"{settings.promote_tolerance:.3f}.")
    return Verdict(decision=DECISIONS[code], better=better, statistic=statistic, threshold=threshold,
                   difference=difference, interval=(lower, upper), reason=reason)

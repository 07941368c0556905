"""Embedding drift between production prompts and the training set: an O(n) statistic and a
threshold calibrated by permutation to a target false-alarm rate.

Statistic: the cosine distance between the centroids of the two sets of unit vectors,
1 - cos(mean(A), mean(B)). Cost O((n + m) d). Under no drift both sets come from one distribution,
so shuffling the pooled vectors between the two sets draws from the statistic's null distribution;
its (1 - alpha) quantile is the threshold (a permutation test at level alpha).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def centroid_distance(a: np.ndarray, b: np.ndarray) -> float:
    """1 - cosine similarity of the two centroids (0 = same direction, up to 2)."""
    ca, cb = a.mean(axis=0), b.mean(axis=0)
    denominator = float(np.linalg.norm(ca) * np.linalg.norm(cb))
    return 1.0 - float(ca @ cb) / denominator if denominator else 0.0


@dataclass(frozen=True)
class DriftResult:
    statistic: float
    threshold: float  # (1 - alpha) quantile of the statistic under shuffling
    p_value: float
    drifted: bool
    recent: int
    reference: int


def drift_test(recent: np.ndarray, reference: np.ndarray, alpha: float = 0.05, permutations: int = 200,
               seed: int = 0) -> DriftResult:
    """Permutation test of centroid distance; `drifted` when the p-value is at most alpha."""
    if len(recent) < 2 or len(reference) < 2:
        raise ValueError("drift needs at least 2 recent and 2 reference vectors")
    recent = np.asarray(recent, dtype=np.float32)
    reference = np.asarray(reference, dtype=np.float32)
    observed = centroid_distance(recent, reference)
    pooled = np.concatenate([recent, reference])
    total, n, size = pooled.sum(axis=0), len(recent), len(recent) + len(reference)
    rng = np.random.default_rng(seed)
    # Every shuffle at once: row i of `chosen` marks which pooled vectors form the first set, so
    # one matrix product (permutations x size) @ (size x d) gives all first-set sums: O(n d) each.
    keys = rng.random((permutations, size), dtype=np.float32)
    chosen = np.zeros((permutations, size), dtype=np.float32)
    np.put_along_axis(chosen, np.argpartition(keys, n, axis=1)[:, :n], 1.0, axis=1)
    sums = chosen @ pooled
    first, second = sums / n, (total - sums) / (size - n)
    cosine = (first * second).sum(axis=1) / (np.linalg.norm(first, axis=1) * np.linalg.norm(second, axis=1))
    null = 1.0 - cosine.astype(np.float64)
    p_value = (1 + int((null >= observed).sum())) / (permutations + 1)
    return DriftResult(statistic=observed, threshold=float(np.quantile(null, 1 - alpha)),
                       p_value=p_value, drifted=p_value <= alpha, recent=len(recent),
                       reference=len(reference))

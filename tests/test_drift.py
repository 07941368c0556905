"""The drift statistic on seeded synthetic embeddings: power on a 10% topic shift, false alarms
on no shift."""

import numpy as np
import pytest

from llmops_dagster.loop.drift import centroid_distance, drift_test

DIMENSIONS = 384


def topics(rng, count: int) -> np.ndarray:
    centers = rng.normal(size=(count, DIMENSIONS))
    return centers / np.linalg.norm(centers, axis=1, keepdims=True)


def sample(rng, centers: np.ndarray, weights: np.ndarray, n: int, noise: float = 1.2) -> np.ndarray:
    """Unit vectors around topic centers (like sentence embeddings of prompts on several topics)."""
    chosen = rng.choice(len(centers), size=n, p=weights)
    vectors = centers[chosen] + noise * rng.normal(size=(n, DIMENSIONS)) / np.sqrt(DIMENSIONS)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_identical_sets_have_zero_distance():
    vectors = topics(np.random.default_rng(0), 5)
    assert centroid_distance(vectors, vectors) == pytest.approx(0.0, abs=1e-6)


def test_power_on_a_ten_percent_topic_shift_and_false_alarms_on_none():
    trials, n = 200, 300
    detected = false_alarms = 0
    for trial in range(trials):
        rng = np.random.default_rng(trial)
        centers = topics(rng, 9)  # 8 training topics, 1 new one
        base = np.full(8, 1 / 8)
        reference = sample(rng, centers[:8], base, n)
        same = sample(rng, centers[:8], base, n)
        shifted = np.concatenate([sample(rng, centers[:8], base, int(n * 0.9)),
                                  sample(rng, centers[8:], np.ones(1), n - int(n * 0.9))])
        false_alarms += drift_test(same, reference, alpha=0.05, permutations=200, seed=trial).drifted
        detected += drift_test(shifted, reference, alpha=0.05, permutations=200, seed=trial).drifted
    assert detected / trials >= 0.9, f"power {detected / trials:.2f}"
    assert false_alarms / trials <= 0.05, f"false alarms {false_alarms / trials:.3f}"

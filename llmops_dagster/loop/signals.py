"""What the sensors decide from production signals: the post-deployment guard's verdict.
The rows they read come from llmops_dagster/serving/traffic_log.py."""

from __future__ import annotations

from llmops_dagster.serving.traffic_log import LiveRate


def guard_verdict(new: LiveRate, previous: LiveRate, margin: float, min_ratings: int) -> str | None:
    """Why the new version must be rolled back, or None: its negative rate exceeds the previous
    version's by more than `margin`, over at least `min_ratings` ratings of each."""
    if new.ratings < min_ratings or previous.ratings < min_ratings:
        return None
    if new.negative_rate > previous.negative_rate + margin:
        return (f"live negative-feedback rate of {new.version} is {new.negative_rate:.1%} over "
                f"{new.ratings} ratings, above {previous.version}'s {previous.negative_rate:.1%} over "
                f"{previous.ratings} by more than the margin {margin:.1%}")
    return None

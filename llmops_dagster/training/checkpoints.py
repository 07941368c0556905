"""Crash-safe DeepSpeed checkpoints: every rank writes into a staging tag, then rank 0 writes a
completion marker and renames the tag into place. A tag without the marker never counts.

Layout under a run's checkpoint root:

    step-000004/          complete: DeepSpeed's files + COMPLETE (JSON: global step, time)
    .staging-step-000006/ being written, or left by a crash: ignored and removed on resume
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

COMPLETE = "COMPLETE"
STAGING_PREFIX = ".staging-"


def tag_for(step: int) -> str:
    return f"step-{step:06d}"


def staging_tag(step: int) -> str:
    return f"{STAGING_PREFIX}{tag_for(step)}"


def publish(root: Path, step: int, state: dict) -> Path:
    """Mark the staged checkpoint of `step` complete and rename it into place (rank 0 only,
    after every rank has written its shards)."""
    staged = root / staging_tag(step)
    (staged / COMPLETE).write_text(json.dumps({"global_step": step, "time": time.time(), **state}))
    final = root / tag_for(step)
    staged.rename(final)
    return final


def latest_complete(root: Path) -> tuple[str, int] | None:
    """The newest complete checkpoint as (tag, global step), or None."""
    found = []
    for path in root.glob("step-*"):
        marker = path / COMPLETE
        if path.is_dir() and marker.is_file():
            found.append((json.loads(marker.read_text())["global_step"], path.name))
    if not found:
        return None
    step, tag = max(found)
    return tag, step


def remove_partial(root: Path) -> list[str]:
    """Delete staging folders a crash left behind; return their names."""
    removed = []
    for path in root.glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path.name)
    return removed

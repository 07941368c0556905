"""Secrets on this machine: files only their owner reads, so that a credential never travels as a
process argument, an actor's constructor argument (Ray keeps those in its GCS) or metadata."""

from __future__ import annotations

import os
from pathlib import Path

from llmops_dagster.infra.settings import llmops_home


def write_private(path: Path, text: str) -> Path:
    """Write `text` to `path`, created 0600 in a 0700 folder (never readable by others, not even
    between creation and chmod); replaced atomically when it exists."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}")
    descriptor = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(staging, path)
    return path


def serving_database_url_file(url: str) -> Path:
    """The file the Serve replicas of a local head read their database URL from."""
    return write_private(llmops_home() / "secrets" / "serving-database-url", url)

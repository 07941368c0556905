"""Where the platform keeps its state on this machine. Read at call time, never at import time."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
PROMPTS_DIR = PACKAGE_DIR.parent / "prompts"


def llmops_home() -> Path:
    """`LLMOPS_HOME`, or `.llmops/` in the working directory (the repo root under make)."""
    return Path(os.environ.get("LLMOPS_HOME") or Path.cwd() / ".llmops").resolve()


def dagster_home() -> Path:
    return Path(os.environ.get("DAGSTER_HOME") or llmops_home() / "dagster_home").resolve()

"""Where the platform keeps its state on this machine. Read at call time, never at import time."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
PROMPTS_DIR = PACKAGE_DIR.parent / "prompts"


def llmops_home() -> Path:
    """`LLMOPS_HOME`, or `.llmops/` in the working directory (the repo root under make)."""
    return Path(os.environ.get("LLMOPS_HOME") or Path.cwd() / ".llmops").resolve()


class SettingError(ValueError):
    """A setting from the environment cannot be used; the message names it."""


def port_from_env(name: str, default: int) -> int:
    """A TCP port from environment variable `name` (unset or empty: `default`); a clear error
    naming the variable otherwise."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise SettingError(f"{name} must be a TCP port (1-65535), got {value!r}")
    return int(value)


def dagster_home() -> Path:
    return Path(os.environ.get("DAGSTER_HOME") or llmops_home() / "dagster_home").resolve()


def declared(declaration: type, name: str):
    """The config field for setting `name` of the dataclass `declaration`, with the default and the
    description (`metadata["help"]`) declared there: each setting is declared once, in the library,
    and the Dagster config, the training script's run file and the serving config derive from it."""
    import dataclasses

    from pydantic import Field

    fields = {f.name: f for f in dataclasses.fields(declaration)}
    if name not in fields or "help" not in fields[name].metadata:
        raise KeyError(f"{declaration.__name__}.{name} is not a declared setting (a field with help)")
    field = fields[name]
    if field.default_factory is not dataclasses.MISSING:
        return Field(default_factory=field.default_factory, description=field.metadata["help"])
    return Field(default=field.default, description=field.metadata["help"])

"""Where the platform keeps its state on this machine. Read at call time, never at import time."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # llmops_dagster/
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


BOUNDS = ("gt", "ge", "lt", "le")  # dataclass field metadata that becomes pydantic Field bounds


def declared(declaration: type, name: str):
    """The config field for setting `name` of the dataclass `declaration`, with the default, the
    description (`metadata["help"]`) and the bounds (`metadata["ge"]` etc.) declared there: each
    setting is declared once, in the library, and the Dagster config, the training script's run
    file and the serving config derive from it."""
    import dataclasses

    from pydantic import Field

    fields = {f.name: f for f in dataclasses.fields(declaration)}
    if name not in fields or "help" not in fields[name].metadata:
        raise KeyError(f"{declaration.__name__}.{name} is not a declared setting (a field with help)")
    field = fields[name]
    bounds = {bound: field.metadata[bound] for bound in BOUNDS if bound in field.metadata}
    if field.default_factory is not dataclasses.MISSING:
        return Field(default_factory=field.default_factory, description=field.metadata["help"], **bounds)
    return Field(default=field.default, description=field.metadata["help"], **bounds)


def declared_default(declaration: type, name: str):
    """The default of setting `name` of the dataclass `declaration` (for a setting of another
    component that follows it)."""
    import dataclasses

    field = {f.name: f for f in dataclasses.fields(declaration)}[name]
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default


def copy_into(config, declaration: type, **values):
    """An instance of the dataclass `declaration` with each of its fields taken by name from
    `config` (a dg.Config or any object with those attributes); `values` replace or add fields."""
    import dataclasses

    names = [f.name for f in dataclasses.fields(declaration) if f.init and f.name not in values]
    return declaration(**{name: getattr(config, name) for name in names}, **values)


# Settings the operator owns: what the platform executes or where it connects (the trainer's
# launcher, its nodes and how they are started). They come from the platform's environment or from
# the deployment file, never from run config, which anyone who can launch a run writes.
DEPLOYMENT_FILE_ENV = "LLMOPS_DEPLOYMENT_FILE"
DEPLOYMENT_FILE_NAME = "deployment.toml"


def deployment_file() -> Path | None:
    """The operator's deployment file: the path in LLMOPS_DEPLOYMENT_FILE (which must exist), else
    $LLMOPS_HOME/deployment.toml when there is one, else None."""
    named = os.environ.get(DEPLOYMENT_FILE_ENV, "").strip()
    if named:
        path = Path(named).expanduser()
        if not path.is_file():
            raise SettingError(f"{DEPLOYMENT_FILE_ENV} names {path}, which is not a file")
        return path.resolve()
    path = llmops_home() / DEPLOYMENT_FILE_NAME
    return path if path.is_file() else None


def check_operator_owned(path: Path, setting: str) -> Path:
    """`path` when only the platform's user can change it: the file and its folder are owned by
    this process's user (or root) and neither is writable by group or others (a folder with the
    sticky bit, like /tmp, lets no one else replace the file). Else a SettingError naming `path`
    and `setting`."""
    import stat

    path = Path(path).resolve()
    owners = {os.geteuid(), 0}
    for target, kind in ((path, "file"), (path.parent, "folder")):
        info = target.stat()
        sticky_folder = kind == "folder" and info.st_mode & stat.S_ISVTX
        problems = [f"owned by uid {info.st_uid}"] if info.st_uid not in owners else []
        if info.st_mode & stat.S_IWGRP and not sticky_folder:
            problems.append("group-writable")
        if info.st_mode & stat.S_IWOTH and not sticky_folder:
            problems.append("world-writable")
        if problems:
            raise SettingError(
                f"{setting}: {target} ({kind} of {path.name}) is {' and '.join(problems)}; it must "
                f"be owned by the platform's user (uid {os.geteuid()}) and writable by no one else "
                f"(chmod go-w {target})")
    return path


def deployment_table(section: str) -> tuple[dict, Path | None]:
    """The `[section]` table of the deployment file (empty without a file) and the file's path;
    the file must be the operator's (check_operator_owned)."""
    import tomllib

    path = deployment_file()
    if path is None:
        return {}, None
    check_operator_owned(path, "deployment file")
    try:
        table = tomllib.loads(path.read_text()).get(section, {})
    except tomllib.TOMLDecodeError as error:
        raise SettingError(f"deployment file {path}: {error}") from error
    if not isinstance(table, dict):
        raise SettingError(f"deployment file {path}: [{section}] must be a table")
    return table, path

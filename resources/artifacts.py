"""Where products live: one write-once folder a version under a configurable root, on storage that
is swapped by a setting: this machine's disk, or a filesystem every node mounts."""

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import dagster as dg
from pydantic import Field

from llmops_dagster.dataset.sources import content_hash_of_path
from llmops_dagster.settings import llmops_home

LOCAL = "local"
SHARED = "shared"


class ArtifactStorageError(ValueError):
    """The artifact root cannot hold products on the configured storage; the message names the setting."""


class ArtifactStore(dg.ConfigurableResource):
    """Versioned product folders under `root`: written once into a temporary folder, then renamed
    into place, so a crash never leaves half a version and a version is never overwritten.

    `storage` says what the root is. `local`: a folder on this machine's disk, made when missing (one
    machine, including several training nodes started on it). `shared`: a filesystem mounted at the
    same path on every node (NFS, Lustre, EFS, Filestore), which the training ranks of every node,
    the eval and the Serve replicas read and write by path. A shared root is never made here (a
    missing root is a missing mount: products written there would stay on this node's disk), and a
    version's files are flushed (fsync) before its folder is renamed into place, so a node that
    sees the version sees all of it."""

    root: str = Field(default="", description="Artifact root; empty means $LLMOPS_HOME/artifacts.")
    storage: str = Field(
        default=LOCAL,
        description="'local': this machine's disk. 'shared': a filesystem mounted at `root` on every "
        "node (required when training nodes or Serve replicas run on other machines).",
    )

    def root_path(self) -> Path:
        if self.storage == LOCAL:
            return Path(self.root).resolve() if self.root else llmops_home() / "artifacts"
        if self.storage != SHARED:
            raise ArtifactStorageError(
                f"artifacts.storage must be {LOCAL!r} or {SHARED!r}, got {self.storage!r}")
        if not self.root:
            raise ArtifactStorageError("artifacts.storage='shared' needs artifacts.root: the path where "
                                       "every node mounts the shared filesystem")
        root = Path(self.root).resolve()
        if not root.is_dir():
            raise ArtifactStorageError(f"artifacts.root {root} does not exist: with artifacts.storage="
                                       "'shared' it must be the mounted shared filesystem (never made here)")
        return root

    def version_dir(self, kind: str, version: str) -> Path:
        return self.root_path() / kind / version

    def write_version(self, kind: str, version: str, write: Callable[[Path], None]) -> Path:
        """Run `write(tmp_dir)` and publish it as `kind/version`; reuse it when it exists."""
        final = self.version_dir(kind, version)
        if final.exists():
            return final
        staging = self._staging(kind)
        try:
            write(staging)
            return self._publish(staging, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def write_content_addressed(self, kind: str, write: Callable[[Path], None]) -> tuple[str, Path]:
        """Run `write(tmp_dir)`; publish it under the SHA-256 of what was written (16 hex digits)."""
        staging = self._staging(kind)
        try:
            write(staging)
            version = content_hash_of_path(staging)[:16]
            return version, self._publish(staging, self.version_dir(kind, version))
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _staging(self, kind: str) -> Path:
        parent = self.root_path() / kind
        parent.mkdir(parents=True, exist_ok=True)
        staging = parent / f".tmp-{uuid.uuid4().hex}"
        staging.mkdir()
        return staging

    def _publish(self, staging: Path, final: Path) -> Path:
        """Rename into place; a version that exists already (same content) is kept as it is."""
        if final.exists():
            return final
        if self.storage == SHARED:
            _flush_tree(staging)
        try:
            staging.rename(final)
        except OSError:
            if not final.exists():  # not a concurrent publish of the same version
                raise
        if self.storage == SHARED:
            _flush(final.parent)
        return final


def _flush(path: Path) -> None:
    """fsync one file or folder (a folder's fsync makes its entries, e.g. a rename, durable)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _flush_tree(folder: Path) -> None:
    """fsync every file and folder under `folder`, the deepest first."""
    for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if not path.is_symlink():
            _flush(path)
    _flush(folder)

"""Where products live: one write-once folder a version under a configurable root, on storage that
is swapped by a setting: this machine's disk, or a filesystem every node mounts.

Products hold people's questions and corrections (datasets, prompt sets) and models trained on
them, so only the platform's user reads them: folders 0700, files 0600, the root included."""

import os
import shutil
import stat
import uuid
from collections.abc import Callable
from pathlib import Path

import dagster as dg
from pydantic import Field, PrivateAttr

from llmops_dagster.dataset.sources import content_hash_of_path
from llmops_dagster.infra.settings import llmops_home

LOCAL = "local"
SHARED = "shared"
PRIVATE_DIR = 0o700
# While a run holds the store, what its process and the processes it starts (the training ranks
# writing checkpoints and merged models, under the DeepSpeed launcher or torchrun) create is theirs
# only: new files 0600, folders 0700.
PRIVATE_UMASK = 0o077


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

    _umask_before: int | None = PrivateAttr(default=None)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self._umask_before = os.umask(PRIVATE_UMASK)

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._umask_before is not None:
            os.umask(self._umask_before)
            self._umask_before = None

    def root_path(self) -> Path:
        if self.storage == LOCAL:
            root = Path(self.root).resolve() if self.root else llmops_home() / "artifacts"
            _private_dir(root)
            return root
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
        _make_private(root)
        return root

    def version_dir(self, kind: str, version: str) -> Path:
        """Where `kind/version` lives; the kind's folder is made (0700) for a writer that fills the
        version folder itself (the fine-tune)."""
        parent = self.root_path() / kind
        _private_dir(parent)
        return parent / version

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
        _private_dir(parent)
        staging = parent / f".tmp-{uuid.uuid4().hex}"
        staging.mkdir(mode=PRIVATE_DIR)
        return staging

    def _publish(self, staging: Path, final: Path) -> Path:
        """Rename into place; a version that exists already (same content) is kept as it is."""
        if final.exists():
            return final
        make_tree_private(staging)
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


def _make_private(path: Path) -> None:
    """Take group and other access away from a folder or file of ours (one of another user, such
    as a shared mount's root made by an administrator, is left as it is)."""
    info = path.lstat()
    mode = stat.S_IMODE(info.st_mode)
    if info.st_uid == os.getuid() and not stat.S_ISLNK(info.st_mode) and mode & 0o077:
        path.chmod(mode & 0o700)  # a 0644 file becomes 0600, a 0755 folder 0700


def _private_dir(path: Path) -> None:
    """Make `path` (0700) when missing; take group and other access away when it exists."""
    path.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    _make_private(path)


def make_tree_private(folder: Path) -> None:
    """No access but the owner's under `folder` (folders 0700, files 0600; an owner's executable
    bit stays), whatever the umask of whoever wrote them."""
    for path in [folder, *folder.rglob("*")]:
        _make_private(path)


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

"""Where products live: one write-once folder a version under a configurable root."""


import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import dagster as dg
from pydantic import Field

from llmops_dagster.dataset.sources import content_hash_of_path
from llmops_dagster.settings import llmops_home


class ArtifactStore(dg.ConfigurableResource):
    """Versioned product folders under `root`: written once into a temporary folder, then renamed
    into place, so a crash never leaves half a version and a version is never overwritten."""

    root: str = Field(default="", description="Artifact root; empty means $LLMOPS_HOME/artifacts.")

    def root_path(self) -> Path:
        return Path(self.root).resolve() if self.root else llmops_home() / "artifacts"

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

    @staticmethod
    def _publish(staging: Path, final: Path) -> Path:
        """Rename into place; a version that exists already (same content) is kept as it is."""
        if final.exists():
            return final
        try:
            staging.rename(final)
        except OSError:
            if not final.exists():  # not a concurrent publish of the same version
                raise
        return final

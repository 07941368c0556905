"""Code versions by stage: editing any file of a stage (its asset modules, its library folder, its
templates) changes that stage's code version and no other's. Touches: a scratch copy of the
source folders under tmp_path only."""

import shutil
from pathlib import Path

import pytest

from llmops_dagster.infra.lineage import REPO_ROOT, STAGES, stage_code_version, stage_sources

SOURCE_FOLDERS = ("assets", "llmops_dagster", "prompts")


@pytest.fixture
def scratch(tmp_path) -> Path:
    for folder in SOURCE_FOLDERS:
        shutil.copytree(REPO_ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def versions(root: Path) -> dict[str, str]:
    stage_code_version.cache_clear()
    return {stage: stage_code_version(stage, root) for stage in STAGES}


def edits() -> list[tuple[str, str]]:
    """(stage, file relative to the root) for every source file of every stage."""
    return [(stage, path.relative_to(REPO_ROOT).as_posix())
            for stage in STAGES for path in stage_sources(stage)]


@pytest.mark.parametrize(("stage", "relative"), [
    ("training", "assets/base_model.py"),  # an asset module named after no stage
    ("training", "llmops_dagster/training/deepspeed_configs/cpu_zero2.json"),
    ("prompts", "prompts/customer_support.v1.jinja"),
    ("serving", "llmops_dagster/serving/admission.py"),
])
def test_these_files_belong_to_their_stage(stage, relative):
    assert relative in {path.relative_to(REPO_ROOT).as_posix() for path in stage_sources(stage)}


def test_an_edit_to_any_file_of_a_stage_changes_that_stage_only(scratch):
    before = versions(scratch)
    assert len(set(before.values())) == len(STAGES)
    for stage, relative in edits():
        path = scratch / relative
        original = path.read_bytes()
        path.write_bytes(original + b"\n")
        after = versions(scratch)
        changed = {name for name in STAGES if after[name] != before[name]}
        assert changed == {stage}, (relative, changed)
        path.write_bytes(original)
    assert versions(scratch) == before
    stage_code_version.cache_clear()

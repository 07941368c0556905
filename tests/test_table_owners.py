"""The seam between assets and the library, read from the source (no database, no Dagster run):
every SQL statement on a table is in the module that owns the table, and the asset modules hold
no SQL and only short asset functions."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("llmops_dagster", "assets", "resources", "schedules")
# Statements that set up the database itself (schema and grants), not rows of one table.
EXEMPT = ("llmops_dagster/migrations/", "llmops_dagster/infra/database_roles.py")

OWNERS = {
    "request_log": "llmops_dagster/serving/traffic_log.py",
    "feedback": "llmops_dagster/serving/traffic_log.py",
    "feedback_audit_log": "llmops_dagster/serving/traffic_log.py",
    "curated_feedback": "llmops_dagster/serving/traffic_log.py",
    "api_keys": "llmops_dagster/serving/credentials.py",
    "signing_keys": "llmops_dagster/serving/credentials.py",
    "model_versions": "llmops_dagster/governance/registry.py",
    "model_audit_log": "llmops_dagster/governance/registry.py",
    "dataset_versions": "llmops_dagster/dataset/dataset_store.py",
    "quarantine_rows": "llmops_dagster/dataset/dataset_store.py",
    "dataset_embeddings": "llmops_dagster/dataset/embeddings.py",
    "prompt_set_versions": "llmops_dagster/prompts/templates.py",
    "eval_reports": "llmops_dagster/evaluation/scoring.py",
    "artifact_redactions": "llmops_dagster/feedback/redaction.py",
}
# Read-only joins on another owner's table, each with its reason: the name of the API key a
# rating or answer came with, read in the same statement as the rating.
JOINED_BY = {"api_keys": {"llmops_dagster/serving/traffic_log.py"}}

SQL = re.compile(r"\b(SELECT|INSERT\s+INTO|UPDATE|DELETE\s+FROM)\b")
TABLE_AFTER = r"\b(?:FROM|JOIN|INTO|UPDATE)\s+(?:ONLY\s+)?{table}\b"
PLACEHOLDER = "\x00"  # stands for a {value} of an f-string


def _source_files() -> list[Path]:
    files = [p for folder in SCANNED for p in sorted((ROOT / folder).rglob("*.py"))]
    return [p for p in files if not p.relative_to(ROOT).as_posix().startswith(EXEMPT)]


def _strings(tree: ast.AST) -> list[str]:
    """Every string constant and f-string of a module (f-string values as PLACEHOLDER), with
    implicitly concatenated literals already joined by the parser; plus `x + " ..."` joins."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            found.append("".join(v.value if isinstance(v, ast.Constant) else PLACEHOLDER
                                 for v in node.values))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.append(node.value)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) in ("table", "Table")
              and node.args and isinstance(node.args[0], ast.Constant)):
            found.append(f"INSERT INTO {node.args[0].value}")  # a Core table: statements on it
    return found


def _statements() -> dict[str, list[str]]:
    """module path -> the SQL statements (or fragments) it holds."""
    return {path.relative_to(ROOT).as_posix(): [s for s in _strings(ast.parse(path.read_text()))
                                                if SQL.search(s)]
            for path in _source_files()}


def test_every_table_of_the_migrations_has_an_owner():
    created = set()
    for path in (ROOT / "llmops_dagster" / "migrations" / "versions").glob("*.py"):
        created |= set(re.findall(r"CREATE TABLE (?:IF NOT EXISTS )?(\w+)", path.read_text()))
    assert created, "no CREATE TABLE found in the migrations"
    assert created <= set(OWNERS), f"tables without an owner: {sorted(created - set(OWNERS))}"


@pytest.mark.parametrize("table", sorted(OWNERS))
def test_sql_on_a_table_is_only_in_its_owner(table):
    pattern = re.compile(TABLE_AFTER.format(table=table), re.IGNORECASE)
    allowed = {OWNERS[table], *JOINED_BY.get(table, ())}
    elsewhere = {module: [s for s in statements if pattern.search(s)]
                 for module, statements in _statements().items() if module not in allowed}
    elsewhere = {module: found for module, found in elsewhere.items() if found}
    assert not elsewhere, f"SQL on {table} outside {OWNERS[table]}: {elsewhere}"
    owner_statements = _statements()[OWNERS[table]]
    assert any(pattern.search(s) for s in owner_statements), f"{OWNERS[table]} has no SQL on {table}"


def test_no_statement_names_its_table_by_a_variable():
    """A table named by a value (FROM {table}) hides which module runs SQL on it."""
    hidden = re.compile(rf"\b(?:FROM|JOIN|INTO|UPDATE)\s+{PLACEHOLDER}", re.IGNORECASE)
    found = {module: [s for s in statements if hidden.search(s)]
             for module, statements in _statements().items()}
    assert not {m: s for m, s in found.items() if s}


def test_owner_modules_say_which_tables_they_own():
    for table, owner in OWNERS.items():
        docstring = ast.get_docstring(ast.parse((ROOT / owner).read_text())) or ""
        assert "Owns" in docstring and table in docstring, f"{owner}'s docstring does not name {table}"


THIN_ASSET_MODULES = ("dataset.py", "prompts.py", "serving.py", "feedback.py")
MAX_ASSET_LINES = 40


def _asset_functions(tree: ast.Module):
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and any(
                "asset" in ast.unparse(d.func if isinstance(d, ast.Call) else d)
                for d in node.decorator_list):
            yield node


@pytest.mark.parametrize("module", THIN_ASSET_MODULES)
def test_asset_functions_are_short(module):
    tree = ast.parse((ROOT / "assets" / module).read_text())
    lengths = {f.name: f.end_lineno - f.lineno + 1 for f in _asset_functions(tree)}
    assert lengths, f"no asset function found in assets/{module}"
    assert all(n <= MAX_ASSET_LINES for n in lengths.values()), lengths


@pytest.mark.parametrize("path", sorted((ROOT / "assets").glob("*.py")), ids=lambda p: p.name)
def test_assets_hold_no_sql(path):
    text = path.read_text()
    assert "sqlalchemy" not in text
    assert not re.search(r"(?<!\w)text\(", text), "a text() statement in an asset module"
    assert not [s for s in _strings(ast.parse(text)) if SQL.search(s) and re.search(
        r"\b(FROM|INTO|UPDATE)\s+\w+", s)]

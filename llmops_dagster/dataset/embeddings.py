"""The drift reference set: embeddings of a dataset version's training prompts in pgvector."""

from __future__ import annotations

import json

import numpy as np
import sqlalchemy as sa
from pgvector.sqlalchemy import Vector  # noqa: F401  (registers the vector type with SQLAlchemy)


def vector_literal(vector) -> str:
    """A vector as pgvector's text form, '[x,y,...]' (7 significant digits: float32 precision)."""
    return "[" + ",".join(f"{x:.7g}" for x in vector) + "]"


def stored_rows(engine: sa.Engine, dataset_version: str) -> int:
    with engine.connect() as connection:
        return connection.execute(
            sa.text("SELECT count(*) FROM dataset_embeddings WHERE dataset_version = :v"),
            {"v": dataset_version},
        ).scalar_one()


def reuse_embeddings(engine: sa.Engine, dataset_version: str, embedder: str, row_numbers: list[int],
                     prompts: list[str]) -> set[int]:
    """Copy, for each (row, prompt), the vector an earlier version stored for the same prompt text
    with the same embedder; return the row numbers that now have one (one statement, in the
    database: no vector leaves it)."""
    if not row_numbers:
        return set()
    with engine.begin() as connection:
        connection.execute(sa.text(
            "INSERT INTO dataset_embeddings (dataset_version, row_number, prompt, embedding, embedder) "
            "SELECT :v, t.row_number, t.prompt, known.embedding, :embedder "
            "FROM unnest(CAST(:rows AS integer[]), CAST(:prompts AS text[])) AS t(row_number, prompt) "
            "CROSS JOIN LATERAL (SELECT e.embedding FROM dataset_embeddings e WHERE e.prompt = t.prompt "
            "AND e.embedder = :embedder AND e.embedder <> '' LIMIT 1) AS known "
            "ON CONFLICT (dataset_version, row_number) DO NOTHING"),
            {"v": dataset_version, "embedder": embedder, "rows": [int(r) for r in row_numbers],
             "prompts": list(prompts)})
        return set(connection.execute(sa.text(
            "SELECT row_number FROM dataset_embeddings WHERE dataset_version = :v"),
            {"v": dataset_version}).scalars())


def store_embeddings(engine: sa.Engine, dataset_version: str, row_numbers: list[int],
                     prompts: list[str], vectors: np.ndarray, embedder: str = "") -> int:
    """Insert the vectors keyed by (dataset version, source row), with the embedder that made
    them (reused by later versions; '' never is); existing keys are left alone.

    Returns the number of rows inserted.
    """
    if len(row_numbers) != len(prompts) or len(prompts) != len(vectors):
        raise ValueError("row_numbers, prompts and vectors must have the same length")
    statement = sa.text(
        "INSERT INTO dataset_embeddings (dataset_version, row_number, prompt, embedding, embedder) "
        "VALUES (:v, :row, :prompt, CAST(:embedding AS vector), :embedder) "
        "ON CONFLICT (dataset_version, row_number) DO NOTHING"
    )
    rows = [
        {"v": dataset_version, "row": int(r), "prompt": p,
         "embedding": vector_literal(vector), "embedder": embedder}
        for r, p, vector in zip(row_numbers, prompts, vectors, strict=True)
    ]
    with engine.begin() as connection:
        result = connection.execute(statement, rows)
    return result.rowcount if result.rowcount >= 0 else len(rows)


def reference_embeddings(engine: sa.Engine, dataset_version: str, limit: int) -> np.ndarray:
    """Up to `limit` training-prompt embeddings of a dataset version (a fixed pseudo-random sample)."""
    with engine.connect() as connection:
        rows = connection.execute(
            sa.text("SELECT embedding::text FROM dataset_embeddings WHERE dataset_version = :v "
                    "ORDER BY md5(row_number::text) LIMIT :n"), {"v": dataset_version, "n": limit}).all()
    return np.array([json.loads(r[0]) for r in rows], dtype=np.float32)

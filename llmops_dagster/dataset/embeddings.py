"""The drift reference set: embeddings of a dataset version's training prompts in pgvector. Owns
dataset_embeddings: every SQL statement on it is here."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import numpy as np
import pandas as pd
import sqlalchemy as sa
from pgvector.sqlalchemy import Vector  # noqa: F401  (registers the vector type with SQLAlchemy)

from llmops_dagster.prompts.rendering import embedding_text


def vector_literal(vector) -> str:
    """A vector as pgvector's text form, '[x,y,...]' (7 significant digits: float32 precision)."""
    return "[" + ",".join(f"{x:.7g}" for x in vector) + "]"


def training_prompts(accepted: pd.DataFrame) -> pd.DataFrame:
    """The training split of a dataset version's accepted rows, with `_embedded`: what is embedded
    for each example, the user's message (rendering.embedding_text, as the drift sensor embeds
    each served request)."""
    train = accepted[accepted["split"] == "train"]
    contexts = train["context"] if "context" in train else [None] * len(train)
    return train.assign(_embedded=[embedding_text(p, c) for p, c in zip(train["prompt"], contexts,
                                                                        strict=True)])


def embed_and_store(engine: sa.Engine, dataset_version: str, rows: pd.DataFrame,
                    embed: Callable[[list[str]], np.ndarray], embedder: str) -> float:
    """Embed `rows` (training_prompts) with `embed` and store the vectors; the model's own time (s)."""
    started = time.perf_counter()
    vectors = embed(rows["_embedded"].tolist())
    embedding_s = time.perf_counter() - started
    store_embeddings(engine, dataset_version, rows["_row_number"].tolist(), rows["_embedded"].tolist(),
                     vectors, embedder)
    return embedding_s


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


def delete_rows(connection: sa.Connection, dataset_version: str, row_numbers: list[int]) -> int:
    """Delete the embeddings of some rows of a dataset version (a purge); how many."""
    return connection.execute(
        sa.text("DELETE FROM dataset_embeddings WHERE dataset_version = :v "
                "AND row_number = ANY(:rows)"),
        {"v": dataset_version, "rows": row_numbers}).rowcount


def reference_embeddings(engine: sa.Engine, dataset_version: str, limit: int) -> np.ndarray:
    """Up to `limit` training-prompt embeddings of a dataset version (a fixed pseudo-random sample)."""
    with engine.connect() as connection:
        rows = connection.execute(
            sa.text("SELECT embedding::text FROM dataset_embeddings WHERE dataset_version = :v "
                    "ORDER BY md5(row_number::text) LIMIT :n"), {"v": dataset_version, "n": limit}).all()
    return np.array([json.loads(r[0]) for r in rows], dtype=np.float32)


def nearest_rows(engine: sa.Engine, dataset_version: str, vector, k: int) -> list[tuple[int, float]]:
    """The `k` training rows of a dataset version whose prompt embeddings are nearest to `vector`,
    nearest first: (row number, cosine distance). An exact search over that version's rows (its
    primary-key range), not the HNSW index: the index searches every version's rows, and filtering
    its ef_search candidates by version afterwards can leave fewer than `k`."""
    with engine.connect() as connection:
        return [(int(row), float(distance)) for row, distance in connection.execute(
            sa.text("WITH version_rows AS MATERIALIZED (SELECT row_number, embedding "
                    "FROM dataset_embeddings WHERE dataset_version = :v) "
                    "SELECT row_number, embedding <=> CAST(:q AS vector) AS distance "
                    "FROM version_rows ORDER BY distance, row_number LIMIT :k"),
            {"v": dataset_version, "q": vector_literal(vector), "k": k})]

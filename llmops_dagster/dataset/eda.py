"""An exploratory profile of raw examples: size, nulls, token lengths, duplicates, slices."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from llmops_dagster.dataset.validation import count_tokens
from llmops_dagster.infra.plots import figure_markdown


@dataclass
class Profile:
    rows: int
    nulls: dict[str, int]
    tokens: pd.DataFrame  # per text column: count, mean, p50, p95, max (tokens)
    duplicate_rows: int  # rows equal to an earlier row in every source column
    slices: dict[str, int]
    plot_markdown: str

    def markdown(self) -> str:
        nulls = "\n".join(f"| {c} | {n} |" for c, n in self.nulls.items())
        slices = "\n".join(f"| {i} | {n} |" for i, n in self.slices.items())
        return (
            f"**{self.rows} rows, {self.duplicate_rows} exact duplicates**\n\n"
            f"| column | nulls |\n|---|---|\n{nulls}\n\n"
            f"Length in tokens\n\n{self.tokens.to_markdown()}\n\n"
            f"| slice | rows |\n|---|---|\n{slices}\n\n{self.plot_markdown}"
        )


def profile_examples(frame: pd.DataFrame, text_columns: tuple[str, ...] = ("prompt", "response"),
                     ) -> Profile:
    """Profile the source columns of raw examples (columns starting with _ are bookkeeping)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [c for c in frame.columns if not c.startswith("_")]
    token_counts = {c: count_tokens(frame[c]) for c in text_columns if c in frame.columns}
    tokens = pd.DataFrame(
        {
            c: {
                "count": int(s.notna().sum()),
                "mean": round(float(s.mean()), 1) if s.notna().any() else 0.0,
                "p50": float(s.quantile(0.5)) if s.notna().any() else 0.0,
                "p95": float(s.quantile(0.95)) if s.notna().any() else 0.0,
                "max": float(s.max()) if s.notna().any() else 0.0,
            }
            for c, s in token_counts.items()
        }
    ).T
    slices = (
        frame["slice"].astype(str).value_counts().to_dict() if "slice" in frame.columns else {}
    )
    duplicates = int(frame[columns].astype(str).duplicated().sum()) if columns else 0

    figure, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    for column, counts in token_counts.items():
        axes[0].hist(counts.dropna(), bins=30, alpha=0.6, label=column)
    axes[0].set_xlabel("length (tokens)")
    axes[0].set_ylabel("rows")
    axes[0].legend()
    axes[0].set_title("Length distribution")
    if slices:
        axes[1].barh(list(slices)[:20], list(slices.values())[:20])
        axes[1].set_xlabel("rows")
        axes[1].set_title("Slices")
    figure.tight_layout()
    return Profile(
        rows=len(frame),
        nulls={c: int(frame[c].isna().sum()) for c in columns},
        tokens=tokens,
        duplicate_rows=duplicates,
        slices=slices,
        plot_markdown=figure_markdown(figure, "EDA: token lengths and slices"),
    )

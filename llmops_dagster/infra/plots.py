"""Plots as Markdown a person can see in the Dagster UI (a PNG inlined as a data URI)."""

from __future__ import annotations

import base64
import io


def figure_markdown(figure, alt: str) -> str:
    """Render a matplotlib figure to PNG and return it as an inline Markdown image."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    plt.close(figure)
    encoded = base64.b64encode(buffer.getvalue()).decode()
    return f"![{alt}](data:image/png;base64,{encoded})"

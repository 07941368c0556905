"""The loss curve of a fine-tune, as Markdown for the Dagster UI."""

from llmops_dagster.infra.plots import figure_markdown


def loss_curve_markdown(history: list[dict]) -> str:
    """Training loss and learning rate by optimizer step (from metrics.jsonl records)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    figure, loss_axis = plt.subplots(figsize=(7, 3.2))
    loss_axis.plot(steps, [h["loss"] for h in history], label="train loss")
    loss_axis.set_xlabel("optimizer step")
    loss_axis.set_ylabel("loss (nats/token)")
    lr_axis = loss_axis.twinx()
    lr_axis.plot(steps, [h["lr"] for h in history], color="tab:orange", alpha=0.6, label="lr")
    lr_axis.set_ylabel("learning rate")
    loss_axis.set_title("Fine-tune loss")
    figure.tight_layout()
    return figure_markdown(figure, "loss curve")

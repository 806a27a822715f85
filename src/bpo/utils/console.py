"""Console output: one rich console, and the metrics table every stage prints."""

from __future__ import annotations

from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

console = Console(stderr=True)

TABLE_METRICS = (
    "chair_i",
    "chair_s",
    "recall",
    "partner_share",
    "partner_chance",
    "pope_random_f1",
    "pope_popular_f1",
    "pope_adversarial_f1",
    "pope_adversarial_yes_ratio",
)


def metrics_table(arms: dict[str, dict], metrics=TABLE_METRICS) -> Table:
    """A table with one row per metric and one column per arm (missing values shown as '-')."""
    table = Table(title="Hallucination on held-out scenes")
    table.add_column("metric")
    for arm in arms:
        table.add_column(arm, justify="right")
    for name in metrics:
        cells = [f"{values[name]:.4f}" if name in values else "-" for values in arms.values()]
        table.add_row(name, *cells)
    return table


def print_metrics_table(arms: dict[str, dict]) -> None:
    Console().print(metrics_table(arms))


@contextmanager
def progress_bar(description: str, total: int, enabled: bool = True):
    """A progress bar with rate and ETA; yields `advance(step, loss=None, accuracy=None)`."""
    if not enabled:
        yield lambda *_args: None
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[loss]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(description, total=total, loss="")

        def advance(_step: int, loss: float | None = None, accuracy: float | None = None) -> None:
            shown = f"loss {loss:.3f}" if loss is not None else ""
            if accuracy is not None:  # DPO's rewards/accuracies
                shown += f" acc {accuracy:.2f}"
            progress.update(task, advance=1, loss=shown)

        yield advance


def print_negatives_table(negatives: dict[str, dict]) -> None:
    """How many bootstrapped negatives hold a hallucinated object, per method (and noise step)."""
    table = Table(title="Bootstrapped negatives (rejected answers) against the exact scenes")
    for column in (
        "method",
        "negatives",
        "with_hallucination",
        "chair_i",
        "partner_share",
        "partner_chance",
    ):
        table.add_column(column, justify="left" if column == "method" else "right")
    for method, stats in negatives.items():
        cells = [
            f"{stats[k]:.4f}"
            for k in ("with_hallucination", "chair_i", "partner_share", "partner_chance")
        ]
        table.add_row(method, str(stats["negatives"]), *cells)
    Console().print(table)

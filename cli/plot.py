"""`nmt plot`: training curves of one or more runs on one figure."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.common import console, handle_errors, summary_table
from nmt.plot import read_metrics, run_labels, training_curves


@handle_errors
def plot(
    runs: Annotated[list[Path], typer.Argument(
        help="Run directories (holding metrics.jsonl) or metrics files, compared on one figure.", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="PNG to write.")] = Path("curves.png"),
) -> None:
    """Draw training and validation loss, validation BLEU and learning rate against updates."""
    metrics = [read_metrics(run) for run in runs]
    training_curves(metrics, output)
    rows: list[tuple[str, object]] = []
    for label, run in zip(run_labels(metrics), metrics, strict=True):
        losses = run.series[("valid", "loss")][1]
        bleus = run.series[("valid", "bleu")][1]
        best = [f"{run.last_update:,} updates"]
        if losses:
            best.append(f"best valid loss {min(losses):.3f}")
        if bleus:
            best.append(f"best BLEU {max(bleus):.2f}")
        rows.append((label, ", ".join(best)))
    console.print(summary_table("Training curves", [*rows, ("output", str(output))]))

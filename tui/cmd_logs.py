"""``gpt-tui log-export RUN --to tensorboard|wandb``: a run's metrics.jsonl for TensorBoard or W&B."""

from __future__ import annotations

import typer

from .common import friendly_errors


def log_export(
    run: str = typer.Argument(..., help="Run directory (holding metrics.jsonl)."),
    to: str = typer.Option("tensorboard", "--to", help="tensorboard or wandb."),
    out: str = typer.Option(None, "--out", "-o", show_default=False,
                            help="Folder to write: TensorBoard's (default RUN/tensorboard), or the one that gets "
                            "W&B's wandb/ (default RUN)."),
) -> None:
    """Write a run's metrics and samples (metrics.jsonl) as TensorBoard event files or a W&B run,
    for runs trained without --log."""
    from engine.loggers import export_metrics

    dest, counts = export_metrics(run, to.strip().lower(), out)
    steps = counts.get("train/loss", 0)
    evals = counts.get("eval/val_loss", 0)
    samples = counts.get("samples", 0)
    print(f"exported {steps} steps, {evals} evals and {samples} samples -> {dest}")
    if to == "tensorboard":
        print(f"view them with: tensorboard --logdir {dest}")
    else:
        print(f"an offline W&B run uploads with: wandb sync {dest}/offline-run-*")


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    app.command("log-export")(friendly_errors(log_export))

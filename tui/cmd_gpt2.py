"""GPT-2 commands: ``import-gpt2`` and ``export`` (``finetune`` is in :mod:`tui.cmd_train`)."""

from __future__ import annotations

import sys

import typer

from .common import fail, friendly_errors


def import_gpt2(
    source: str = typer.Argument(..., help="GPT-2 folder: Hugging Face (config.json + model.safetensors) or "
                                 "OpenAI's (hparams.json + model.ckpt.*)."),
    out: str = typer.Option(..., "--out", "-o", help="Checkpoint to write: a .pt file, or a run directory."),
) -> None:
    """Convert GPT-2 weights into a gpt-tui checkpoint (for generate, --init and finetune)."""
    from engine.weights import import_gpt2 as convert

    path, model, src = convert(source, out)
    kind = "Hugging Face" if src.format == "hf" else "OpenAI TensorFlow"
    print(f"imported GPT-2 {src.size_name} ({kind}; {model.cfg.n_layer} layers, {model.cfg.n_embd} wide, "
          f"context {model.cfg.context_length}, {model.num_params():,} parameters) -> {path}")


def export(
    source: str = typer.Argument(..., help="Run directory or checkpoint file."),
    out: str = typer.Option(..., "--out", "-o", help="Checkpoint to write: a .pt file, or a run directory "
                            "(--format hf: a folder)."),
    merge: bool = typer.Option(False, "--merge", help="Fold LoRA adapters into the base (needed for LoRA checkpoints)."),
    fmt: str = typer.Option("gpt-tui", "--format", help="gpt-tui (a checkpoint) or hf (a Hugging Face GPT-2 folder: "
                            "model.safetensors, config.json, tokenizer files; LoRA adapters merged)."),
) -> None:
    """Write a checkpoint's full weights (no optimizer state); --merge folds LoRA adapters in; --format hf for transformers."""
    from .cmd_export import FORMATS, export_hf_command

    if fmt not in FORMATS:
        fail(f"unknown export format {fmt!r}: use --format {' or --format '.join(FORMATS)}")
    if fmt == "hf":
        return export_hf_command(source, out)
    from engine import checkpoint as ck
    from engine.weights import model_from_checkpoint, write_weights

    ckpt = ck.load_checkpoint(source)
    if ckpt.kind == "lora" and not merge:
        fail(f"{ckpt.path} holds LoRA adapters only: add --merge to write the merged full weights")
    model = model_from_checkpoint(ckpt)
    extra = dict(ckpt.extra, exported_from=ckpt.path)
    train_config = dict(ckpt.train_config) or None
    if train_config and train_config.get("lora_rank"):
        train_config["lora_rank"] = 0  # the weights are full now
    path = write_weights(out, model, ckpt.tokenizer, train_config=train_config, extra=extra, step=ckpt.step,
                         reason="export")
    what = "merged LoRA adapters into" if ckpt.kind == "lora" else "exported"
    print(f"{what} {model.num_params():,} parameters -> {path}", file=sys.stdout)


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    app.command("import-gpt2")(friendly_errors(import_gpt2))
    app.command("export")(friendly_errors(export))

"""GPT-2 commands: ``import-gpt2``, ``finetune`` (instruction data, full or LoRA) and ``export``."""

from __future__ import annotations

import inspect
import sys
import typing
from typing import Any

import typer

from .common import fail, friendly_errors

# train's flags that finetune does not take: the architecture and tokenizer come from --init,
# and the data are records, not windows of a text.
_NOT_FOR_FINETUNE = {"preset", "tokenizer", "context", "stride", "val_ratio", "qkv_bias", "tie_weights",
                     "n_layer", "n_head", "n_embd", "weight_init", "prompt"}

# Defaults that differ from pretraining (LLMs-from-scratch chapter 7).
FINETUNE_DEFAULTS = {"lr": 5e-5, "dropout": 0.0, "epochs": 2, "batch_size": 8, "eval_every": 5,
                     "eval_batches": 5, "sample_tokens": 256}


# train's options whose meaning or default differs here: (flag names, help)
_FINETUNE_HELP = {
    "data": (("--data", "-d"), "Alpaca-format JSON file(s) of {instruction, input, output} records "
             "(e.g. instruction-data.json); repeatable. Split 85% train / 10% test / 5% val in file order."),
    "init": (("--init",), "GPT-2 folder (Hugging Face or OpenAI) or gpt-tui checkpoint/run to start from."),
    "batch_size": (("--batch-size", "-b"), "Records per micro-batch (default 8)."),
    "epochs": (("--epochs",), "Passes over the training records (default 2)."),
    "lr": (("--lr",), "Peak learning rate (default 5e-5)."),
    "dropout": (("--dropout",), "Dropout (default 0)."),
    "eval_every": (("--eval-every",), "Evaluate every N steps (default 5)."),
    "eval_batches": (("--eval-batches",), "Batches per loss estimate (default 5)."),
    "sample_tokens": (("--sample-tokens",), "Most tokens per response in samples and test responses (default 256)."),
    "sample_every": (("--sample-every",), "Answer the first 3 val instructions every 'epoch' (default), N steps, or 0."),
}


def _opt(default: Any, *names: str, help: str) -> Any:  # noqa: A002
    return typer.Option(default, *names, help=help, show_default=False)


def _finetune_parameters(train: Any) -> list[inspect.Parameter]:
    """train's options (minus the architecture ones) plus finetuning's, as typer parameters."""
    hints = typing.get_type_hints(train)
    kw = inspect.Parameter.KEYWORD_ONLY
    extra = [
        inspect.Parameter("max_length", kw, annotation=int, default=_opt(
            None, "--max-length", help="Cut examples to this many tokens (default: the model's context).")),
        inspect.Parameter("mask_prompt", kw, annotation=bool, default=_opt(
            None, "--mask-prompt/--no-mask-prompt", help="Leave prompt tokens out of the loss (default on).")),
        inspect.Parameter("lora_rank", kw, annotation=int, default=_opt(
            None, "--lora-rank", help="Train rank-R LoRA adapters on a frozen base (default 0: full finetuning).")),
        inspect.Parameter("lora_alpha", kw, annotation=float, default=_opt(
            None, "--lora-alpha", help="LoRA scale numerator; adapters are scaled by alpha/rank (default 16).")),
        inspect.Parameter("lora_layers", kw, annotation=str, default=_opt(
            None, "--lora-layers", help="Layers with adapters: comma list of attn, mlp, head (default attn,mlp).")),
        inspect.Parameter("test_responses", kw, annotation=int, default=_opt(
            None, "--test-responses", help="Test records answered into RUN/test_responses.json at the end "
            "(default all; 0: none).")),
    ]
    params: list[inspect.Parameter] = []
    for p in inspect.signature(train).parameters.values():
        if p.name in _NOT_FOR_FINETUNE:
            continue
        if p.name in _FINETUNE_HELP:
            names, text = _FINETUNE_HELP[p.name]
            p = p.replace(default=_opt(None, *names, help=text))
        if p.name == "config":
            params.extend(extra)
        params.append(p.replace(kind=kw, annotation=hints[p.name]))
    return params


def finetune(**flags: Any) -> None:
    """Finetune a GPT on instruction data (Alpaca format), fully or with LoRA adapters."""
    from engine.instruct import FinetuneTrainer

    from .cli import config_from_flags, run_training

    config_file, headless, detach = flags.pop("config"), flags.pop("headless"), flags.pop("detach")
    if not flags.get("init") and not flags.get("resume"):
        fail("finetune needs weights to start from: give --init GPT2_FOLDER_OR_CHECKPOINT (or --resume RUN)")
    if not flags.get("data") and not flags.get("resume"):
        fail("finetune needs instruction data: give --data FILE.json (Alpaca format, e.g. instruction-data.json)")
    cfg = config_from_flags(flags, config_file)
    explicit = cfg._explicit  # type: ignore[attr-defined]
    if not cfg.resume:
        for k, v in FINETUNE_DEFAULTS.items():
            if k not in explicit and not (k == "epochs" and "max_steps" in explicit):
                setattr(cfg, k, v)
    cfg.tokenizer = "gpt2"
    if cfg.lora_rank < 0:
        fail(f"--lora-rank must not be negative, got {cfg.lora_rank}: use 0 for full finetuning or e.g. 16")
    if cfg.max_length is not None and cfg.max_length <= 0:
        fail(f"--max-length must be positive, got {cfg.max_length}: give e.g. --max-length 512")
    if cfg.lora_rank:
        from engine.lora import parse_layers

        parse_layers(cfg.lora_layers)
    cfg.validate()
    run_training(cfg, headless=headless, detach=detach, trainer_cls=FinetuneTrainer)


def import_gpt2(
    source: str = typer.Argument(..., help="GPT-2 folder: Hugging Face (config.json + model.safetensors) or "
                                 "OpenAI's (hparams.json + model.ckpt.*)."),
    out: str = typer.Option(..., "--out", "-o", help="Checkpoint to write: a .pt file, or a run directory."),
) -> None:
    """Convert GPT-2 weights into a gpt-tui checkpoint (for generate, --init and finetune)."""
    from engine.pretrained import import_gpt2 as convert

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
    from engine.inference import model_from_checkpoint
    from engine.pretrained import write_weights

    obj = ck.load_checkpoint(source)
    if obj.get("kind") == "lora" and not merge:
        fail(f"{obj['_path']} holds LoRA adapters only: add --merge to write the merged full weights")
    model = model_from_checkpoint(obj)
    extra = dict(obj.get("extra") or {})
    extra["exported_from"] = obj["_path"]
    train_config = dict(obj.get("train_config") or {}) or None
    if train_config and train_config.get("lora_rank"):
        train_config["lora_rank"] = 0  # the weights are full now
    path = write_weights(out, model, obj["tokenizer"], train_config=train_config, extra=extra,
                         step=int(obj.get("step", 0)), reason="export")
    what = "merged LoRA adapters into" if obj.get("kind") == "lora" else "exported"
    print(f"{what} {model.num_params():,} parameters -> {path}", file=sys.stdout)


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    from .cli import train

    ft = friendly_errors(finetune)
    ft.__signature__ = inspect.Signature(_finetune_parameters(train))  # type: ignore[attr-defined]
    ft.__annotations__ = {}
    app.command("finetune")(ft)
    app.command("import-gpt2")(friendly_errors(import_gpt2))
    app.command("export")(friendly_errors(export))

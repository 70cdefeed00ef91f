"""``gpt-tui train`` and ``gpt-tui finetune``: one flag per TrainConfig field.

The flags are made from :class:`engine.config.TrainConfig`: each field's attribute docstring is
its help and :func:`engine.config.default_text` its default, so ``--help`` says what the code does.
"""

from __future__ import annotations

import inspect
import typing
from dataclasses import fields
from typing import Any

import typer

from .common import fail, friendly_errors

SHORT = {"data": "-d", "batch_size": "-b", "out": "-o"}
METAVARS = {"data": "PATH", "log": "NAME", "out": "DIR", "resume": "RUN", "init": "PATH", "lr": "LR", "min_lr": "LR",
            "initial_lr": "LR", "preset": "NAME", "tokenizer": "NAME", "device": "DEVICE", "dtype": "DTYPE"}
BOOL_FLAGS = {"qkv_bias", "tie_weights", "compile", "fsdp", "mask_prompt"}

FINETUNE_ONLY = {"max_length", "mask_prompt", "test_responses", "lora_rank", "lora_alpha", "lora_layers"}
# train's settings that finetune does not take: the architecture and tokenizer come from --init,
# and the data are records, not windows of a text.
NOT_FOR_FINETUNE = {"preset", "tokenizer", "context", "stride", "val_ratio", "qkv_bias", "tie_weights",
                    "n_layer", "n_head", "n_embd", "weight_init", "prompt", "text_field"}

FINETUNE_HELP = {
    "data": "Alpaca-format JSON file(s) of {instruction, input, output} records (e.g. instruction-data.json); "
            "repeatable. Split 85% train / 10% test / 5% val in file order.",
    "init": "GPT-2 folder (Hugging Face or OpenAI) or gpt-tui checkpoint/run to start from.",
    "batch_size": "Records per micro-batch.",
    "epochs": "Passes over the training records.",
    "sample_tokens": "Most tokens per response in samples and test responses.",
    "sample_every": "Answer the first 3 val instructions every 'epoch', N steps, or 0 (never).",
}


def _annotation(name: str, hint: Any) -> Any:
    from engine.config import LIST_SETTINGS

    if name in LIST_SETTINGS:
        return list[str]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def option(name: str, hint: Any, help_text: str, default_help: str) -> inspect.Parameter:
    """The typer parameter of one setting (None when not given, so a config file or the checkpoint decides)."""
    flag = "--" + name.replace("_", "-")
    names = [f"{flag}/--no-{name.replace('_', '-')}"] if name in BOOL_FLAGS else [flag]
    if name in SHORT:
        names.append(SHORT[name])
    text = f"{help_text} (default: {default_help})" if default_help else help_text
    kind = _annotation(name, hint)
    metavar = None if name in BOOL_FLAGS else METAVARS.get(name) or {int: "N", float: "X"}.get(kind, "TEXT")
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=kind,
                             default=typer.Option(None, *names, help=text, show_default=False, metavar=metavar))


def config_parameters(exclude: set[str], help_override: dict[str, str] | None = None,
                      default_override: dict[str, Any] | None = None) -> list[inspect.Parameter]:
    from engine.config import TrainConfig, default_text, field_docs

    docs, hints = field_docs(), typing.get_type_hints(TrainConfig)
    out = []
    for f in fields(TrainConfig):
        if f.name in exclude:
            continue
        text = (help_override or {}).get(f.name) or docs.get(f.name, "")
        default = (default_override or {}).get(f.name)
        out.append(option(f.name, hints[f.name], text, str(default) if default is not None else default_text(f.name)))
    return out


def _front_end_parameters() -> list[inspect.Parameter]:
    kw = inspect.Parameter.KEYWORD_ONLY
    return [
        inspect.Parameter("config", kw, annotation=str, default=typer.Option(
            None, "--config", help="TOML file of settings (flags override it).", show_default=False,
            metavar="FILE")),
        inspect.Parameter("headless", kw, annotation=bool, default=typer.Option(
            False, "--headless", help="No dashboard: progress lines on stdout.")),
        inspect.Parameter("detach", kw, annotation=bool, default=typer.Option(
            False, "--detach", help="Run in the background; attach with `gpt-tui attach RUN_DIR`.")),
        inspect.Parameter("web", kw, annotation=bool, default=typer.Option(
            False, "--web", help="Serve the dashboard to a browser (see `gpt-tui attach --web`).")),
        inspect.Parameter("port", kw, annotation=int, default=typer.Option(
            8000, "--port", help="Port of --web.", metavar="N")),
        inspect.Parameter("host", kw, annotation=str, default=typer.Option(
            "127.0.0.1", "--host", help="Address --web binds to (anyone who reaches it controls the run).",
            metavar="ADDRESS")),
        # listed for --help only: tui.cli takes --debug out of the arguments before parsing (any command has it)
        inspect.Parameter("debug", kw, annotation=bool, default=typer.Option(
            False, "--debug", help="Show the traceback of an error instead of one line.")),
    ]


def _settings(flags: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the settings given, the front end's options) from the parsed flags."""
    front = {k: flags.pop(k) for k in ("config", "headless", "detach", "web", "port", "host", "debug")}
    return flags, front


def _launch(cfg: Any, explicit: frozenset[str], front: dict[str, Any], task: Any = None) -> None:
    from .launch import run_training

    web = None
    if front["web"]:
        from .web import web_runner

        if front["detach"] or front["headless"]:
            other = "--detach" if front["detach"] else "--headless"
            fail(f"--web and {other} do not go together: --web serves the dashboard; to watch a background run "
                 "in a browser, start it with --detach, then: gpt-tui attach RUN --web")
        web = web_runner(front["host"], front["port"])
    run_training(cfg, explicit, task=task, headless=front["headless"], detach=front["detach"], web=web)


def train_settings(given: dict[str, Any], base: dict[str, Any]) -> tuple[Any, frozenset[str]]:
    """The config of ``gpt-tui train`` from the flags given and a TOML file's settings (the embedded
    demo corpus, with no --data, trains ``demo_defaults``: fewer epochs, a higher rate for tiny)."""
    from engine.config import config_from_settings, demo_defaults

    demo = {} if given.get("data") or base.get("data") else demo_defaults(given.get("preset") or base.get("preset"))
    return config_from_settings(given, base, defaults=demo)


def train(**flags: Any) -> None:
    """Train a GPT. Opens the dashboard in a terminal, else runs headless."""
    from engine.config import load_toml

    given, front = _settings(flags)
    base = load_toml(front["config"]) if front["config"] else {}
    cfg, explicit = train_settings(given, base)
    _launch(cfg, explicit, front)


def finetune(**flags: Any) -> None:
    """Finetune a GPT on instruction data (Alpaca format), fully or with LoRA adapters."""
    from engine.config import config_from_settings, finetune_defaults, load_toml
    from engine.instruct import InstructTask

    given, front = _settings(flags)
    if not given.get("init") and not given.get("resume"):
        fail("finetune needs weights to start from: give --init GPT2_FOLDER_OR_CHECKPOINT (or --resume RUN)")
    if not given.get("data") and not given.get("resume"):
        fail("finetune needs instruction data: give --data FILE.json (Alpaca format, e.g. instruction-data.json)")
    if (given.get("lora_rank") or 0) < 0:
        fail(f"--lora-rank must not be negative, got {given['lora_rank']}: use 0 for full finetuning or e.g. 16")
    if given.get("max_length") is not None and given["max_length"] <= 0:
        fail(f"--max-length must be positive, got {given['max_length']}: give e.g. --max-length 512")
    base = load_toml(front["config"]) if front["config"] else {}
    defaults = {} if given.get("resume") else finetune_defaults(given.get("lora_rank") or base.get("lora_rank") or 0)
    cfg, explicit = config_from_settings(given, base, defaults=defaults)
    if cfg.lora_rank:
        from engine.lora import parse_layers

        parse_layers(cfg.lora_layers)
    _launch(cfg, explicit, front, task=InstructTask())


def _command(fn: Any, params: list[inspect.Parameter]) -> Any:
    wrapped = friendly_errors(fn)
    wrapped.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    wrapped.__annotations__ = {}
    return wrapped


def register(app: typer.Typer) -> None:
    """Add ``train`` and ``finetune`` to ``app``."""
    from engine.config import FINETUNE_DEFAULTS, LORA_LR

    app.command("train")(_command(train, config_parameters(FINETUNE_ONLY) + _front_end_parameters()))
    ft_defaults = {k: v for k, v in FINETUNE_DEFAULTS.items() if k != "tokenizer"}
    ft_defaults["lr"] = f"{FINETUNE_DEFAULTS['lr']:g}; {LORA_LR:g} with --lora-rank"
    app.command("finetune")(_command(finetune, config_parameters(NOT_FOR_FINETUNE, FINETUNE_HELP, ft_defaults)
                                     + _front_end_parameters()))

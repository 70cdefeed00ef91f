"""Weights from any source: a gpt-tui checkpoint or run, a LoRA checkpoint (base + adapters), a GPT-2 folder.

This is the one module that turns a path into a model, so the recursion lives in one place: a
LoRA checkpoint's base may itself be any source. GPT-2 folders are read by :mod:`engine.pretrained`,
adapters are applied by :mod:`engine.lora`, checkpoint files are read by :mod:`engine.checkpoint`.
Writing a weights-only checkpoint (``import-gpt2``, ``export``) is here too.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import torch

from . import checkpoint as ck
from .errors import CheckpointError, GptTuiError
from .lora import apply_lora, load_lora_state, merge_lora
from .model import GPT, ModelConfig, describe_shape_mismatch
from .pretrained import GPT2_VOCAB, GPT2Source, is_gpt2_source, load_gpt2, open_source
from .tokenizer import GPT2Tokenizer, Tokenizer, tokenizer_from_spec

_cache: dict[str, Any] = {}


def cached_checkpoint(path: str) -> ck.Checkpoint:
    """A gpt-tui checkpoint, loaded once for the tokenizer, context and weights of one ``--init``."""
    resolved = os.path.abspath(ck.resolve_checkpoint(path))
    key = f"{resolved}|{os.path.getmtime(resolved)}"
    if _cache.get("key") != key:
        _cache.clear()
        _cache.update(key=key, obj=ck.load_checkpoint(resolved))
    return _cache["obj"]


# ------------------------------------------------------------------ checkpoints -> models
def model_from_checkpoint(ckpt: ck.Checkpoint, merge: bool = True) -> GPT:
    """The model of a loaded checkpoint: full weights, or base + LoRA adapters (merged by default)."""
    if ckpt.kind == "lora":
        info = ckpt.lora
        if not isinstance(info, dict):
            raise CheckpointError(f"{ckpt.path} says kind 'lora' but has no adapter description",
                                  "the file is damaged; use another checkpoint")
        model = load_base(info, ModelConfig.from_dict(ckpt.model_config))
        apply_lora(model, int(info["rank"]), float(info["alpha"]), info["layers"])
        load_lora_state(model, ckpt.model)
        return merge_lora(model) if merge else model
    model = GPT(ModelConfig.from_dict(ckpt.model_config))
    diff = describe_shape_mismatch(model, ckpt.model)
    if diff:
        raise CheckpointError(f"checkpoint {ckpt.path} does not fit its model config ({'; '.join(diff[:3])})",
                              "the file is damaged; use another checkpoint")
    model.load_state_dict(ckpt.model)
    return model


def load_base(info: dict[str, Any], mcfg: ModelConfig | None = None, dropout: float | None = None) -> GPT:
    """The base model a LoRA checkpoint refers to, checked against its recorded sha256."""
    path = info.get("base")
    if not path or not os.path.exists(path):
        raise CheckpointError(
            f"the base weights of this LoRA checkpoint ({path}) are missing",
            "put them back at that path, or use a checkpoint written by gpt-tui export --merge",
        )
    ident = source_identity(path)
    if info.get("base_sha256") and ident["sha256"] != info["base_sha256"]:
        raise CheckpointError(
            f"the base weights at {path} changed since the adapters were trained (sha256 differs)",
            "restore the original base weights, or train new adapters",
        )
    model = load_weights(path, dropout)
    if mcfg is not None:
        keys = ("vocab_size", "context_length", "n_layer", "n_head", "n_embd", "qkv_bias", "arch")
        diff = [k for k in keys if getattr(model.cfg, k) != getattr(mcfg, k)]
        if diff:
            raise CheckpointError(f"the base weights at {path} do not match the adapters' model ({', '.join(diff)})",
                                  "give the base the adapters were trained on")
    return model


def set_dropout(model: GPT, p: float) -> None:
    """Change a built model's dropout rate everywhere."""
    model.cfg.dropout = p
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = p
        if hasattr(m, "dropout") and isinstance(m.dropout, float):
            m.dropout = p


def load_weights(path: str, dropout: float | None = None) -> GPT:
    """A GPT from a GPT-2 folder or a gpt-tui checkpoint or run (LoRA checkpoints come back merged)."""
    if is_gpt2_source(path):
        return load_gpt2(path, dropout)[0]
    model = model_from_checkpoint(cached_checkpoint(path))
    _cache.clear()
    if dropout is not None:
        set_dropout(model, dropout)
    return model


# ------------------------------------------------------------------ --init
def init_tokenizer(path: str) -> Tokenizer:
    """The tokenizer that goes with ``--init PATH``: GPT-2's for GPT-2 folders, else the checkpoint's."""
    if is_gpt2_source(path):
        src = open_source(path)
        if src.hparams["n_vocab"] < GPT2_VOCAB:
            raise GptTuiError(f"{path} has a vocabulary of {src.hparams['n_vocab']} ids, fewer than GPT-2's "
                              f"tokenizer ({GPT2_VOCAB})", "use a model with GPT-2's vocabulary")
        return GPT2Tokenizer()
    return tokenizer_from_spec(cached_checkpoint(path).tokenizer)


def init_model_config(path: str) -> ModelConfig:
    """The architecture of ``--init PATH`` (read without building the model)."""
    if is_gpt2_source(path):
        hp = open_source(path).hparams
        return ModelConfig(vocab_size=hp["n_vocab"], context_length=hp["n_ctx"], n_layer=hp["n_layer"],
                           n_head=hp["n_head"], n_embd=hp["n_embd"], dropout=hp["dropout"], qkv_bias=True,
                           tie_weights=hp["tie"])
    return ModelConfig.from_dict(cached_checkpoint(path).model_config)


def init_context_length(path: str) -> int:
    """Length of the position table of ``--init PATH`` (the default --context for it)."""
    return init_model_config(path).context_length


def expected_params(source: str) -> int | None:
    """The parameter count a checkpoint or run records in its meta.json (None: unknown, e.g. GPT-2 folders)."""
    meta = ck.read_checkpoint_meta(source)
    return int(meta.n_params) if meta is not None and meta.n_params else None


def load_init_model(path: str, dropout: float | None = None, context: int | None = None) -> GPT:
    """The model for ``--init PATH`` (a gpt-tui checkpoint or run, or a GPT-2 folder).

    ``dropout`` (when given) replaces the source's; ``context`` must fit its position table.
    """
    model = load_weights(path, dropout)
    if context is not None and context > model.cfg.context_length:
        raise GptTuiError(f"--context {context} is longer than the position table of {path} "
                          f"({model.cfg.context_length} positions)", f"use --context {model.cfg.context_length} or less")
    return model


def source_identity(path: str) -> dict[str, str]:
    """Where the weights of ``path`` are and their sha256, so a LoRA checkpoint can find and check its base."""
    if is_gpt2_source(path):
        src = open_source(path)
        return {"path": os.path.abspath(path), "format": src.format, "sha256": _sha256_files(src.files)}
    resolved = os.path.abspath(ck.resolve_checkpoint(path))
    meta = ck.read_meta(resolved) or {}
    sha = meta.get("sha256") or _sha256_files([resolved])
    return {"path": resolved, "format": "gpt-tui", "sha256": sha}


def _sha256_files(files: list[str]) -> str:
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda fh=fh: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest() if len(files) == 1 else "files:" + h.hexdigest()


# ------------------------------------------------------------------ writing weights
def output_path(out: str, step: int = 0) -> str:
    """``out`` itself for a ``.pt`` path, else ``out`` as a run directory (``out/checkpoints/step-N.pt``)."""
    if out.endswith(".pt"):
        return out
    return ck.checkpoint_name(out, step)


def write_weights(out: str, model: GPT, tokenizer_spec: dict, *, train_config: dict | None = None,
                  extra: dict | None = None, step: int = 0, reason: str = "import") -> str:
    """Write a full-weights gpt-tui checkpoint (no optimizer) that generate and --init accept."""
    from .config import TrainConfig

    mcfg = model.cfg
    if train_config is None:
        preset = next((f"gpt2{s}" for s, n in (("", 768), ("-medium", 1024), ("-large", 1280), ("-xl", 1600))
                       if mcfg.n_embd == n), "gpt2")
        train_config = TrainConfig(preset=preset, tokenizer="gpt2", context=mcfg.context_length,
                                   dropout=mcfg.dropout, qkv_bias=mcfg.qkv_bias, tie_weights=mcfg.tie_weights,
                                   n_layer=mcfg.n_layer, n_head=mcfg.n_head, n_embd=mcfg.n_embd).to_dict()
    ckpt = ck.Checkpoint(model=model.state_dict(), model_config=mcfg.to_dict(), tokenizer=tokenizer_spec,
                         train_config=train_config, step=step, rng=ck.rng_state(), extra=extra or {})
    meta = ck.CheckpointMeta(step=step, reason=reason, n_params=model.num_params())
    return ck.save_checkpoint(output_path(out, step), ckpt, meta)


def import_gpt2(source: str, out: str, dropout: float | None = None) -> tuple[str, GPT, GPT2Source]:
    """Convert a GPT-2 folder into a gpt-tui checkpoint; returns (path written, model, source)."""
    model, src = load_gpt2(source, dropout)
    if src.hparams["n_vocab"] < GPT2_VOCAB:
        raise GptTuiError(f"{source} has a vocabulary of {src.hparams['n_vocab']} ids, fewer than GPT-2's tokenizer "
                          f"({GPT2_VOCAB})", "use a model with GPT-2's vocabulary")
    extra = {"source": os.path.abspath(source), "source_format": src.format, "gpt2_size": src.size_name}
    path = write_weights(out, model, GPT2Tokenizer().spec(), extra=extra, reason="import")
    return path, model, src

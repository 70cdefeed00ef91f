"""Run configuration: one dataclass, one field per flag, saved with every run."""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .errors import GptTuiError
from .model_config import PRESETS, WEIGHT_INITS, ModelConfig, preset_config
from .tokenizer import check_tokenizer_name

OPTIMIZERS = ("adamw", "muon")
"""Values of ``--optimizer`` (engine.optim builds them)."""
CHAR_PRESETS = ("tiny", "bigram")
"""Presets whose ``auto`` tokenizer is char level (the others use GPT-2's BPE)."""
PRESET_LR = {"bigram": 1e-2, "tiny": 1e-3, "small": 1e-3}
"""Default peak learning rate by preset; the GPT-2 sizes use :data:`GPT2_LR`."""
GPT2_LR = 4e-4
"""Default peak learning rate of the GPT-2 sizes (the book's)."""
WARMUP_SHARE = 0.05
"""Default warm-up: this share of the run's steps."""
MIN_LR_DIVISOR = 10
"""Default end of the cosine decay: the peak learning rate divided by this."""


@dataclass
class TrainConfig:
    """Everything a training run needs; ``gpt-tui train`` flags map 1:1 onto these fields."""

    data: list[str] = field(default_factory=list)
    """Text, .jsonl(.gz) or .parquet file, folder, glob, or named corpus (``python-docs``,
    ``the-verdict``, ``tinyshakespeare``: the last two are downloaded once); repeatable."""
    text_field: str = "text"
    """Field holding each document's text in .jsonl/.jsonl.gz records and parquet shards."""
    preset: str = "tiny"
    """Model size: bigram, tiny, small, gpt2, gpt2-medium, gpt2-large, gpt2-xl."""
    tokenizer: str = "auto"
    """``gpt2`` (BPE, 50,257 ids), ``char`` (one id per character of the corpus), or ``auto``."""
    context: int | None = None
    """Tokens per training window."""
    stride: int | None = None
    """Distance between window starts."""
    val_ratio: float = 0.1
    """Fraction of the tokens (at the end of the corpus) held out for validation."""
    batch_size: int = 8
    """Windows per micro-batch (per process under torchrun)."""
    grad_accum: int = 1
    """Micro-batches whose gradients are summed before one optimizer step."""
    epochs: int | None = None
    """Passes over the training windows."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (with --epochs: whichever comes first)."""
    lr: float | None = None
    """Peak learning rate, reached after warm-up."""
    initial_lr: float = 0.0
    """Learning rate at step 0; warm-up goes linearly from here to --lr."""
    min_lr: float | None = None
    """Learning rate at the end of the cosine decay (equal to --lr for a constant rate)."""
    warmup_steps: int | None = None
    """Linear warm-up steps."""
    optimizer: str = "adamw"
    """``adamw`` for every parameter, or ``muon``: torch's Muon for the 2-D weights of the
    transformer blocks and AdamW for embeddings, LM head, norms and biases (engine.optim)."""
    muon_lr: float = 0.02
    """Peak learning rate of the Muon matrices with --optimizer muon (nanochat's 0.02; the schedule
    scales it as it scales --lr; torch's Muon multiplies it by sqrt(max(1, rows/cols)) per matrix)."""
    weight_decay: float = 0.1
    """AdamW weight decay, applied to matrices only (with --optimizer muon, Muon's matrices shrink
    by the same factor per step: its decay is weight_decay * lr / muon_lr)."""
    beta1: float = 0.9
    """AdamW beta1 (decay of the gradient's running mean)."""
    beta2: float = 0.95
    """AdamW beta2 (decay of the squared gradient's running mean; nanoGPT's 0.95, the book and
    PyTorch use 0.999)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 turns clipping off)."""
    dropout: float | None = None
    """Dropout rate."""
    qkv_bias: bool | None = None
    """Bias on the attention's query/key/value projection."""
    tie_weights: bool | None = None
    """Tie the LM head to the token embedding."""
    n_layer: int | None = None
    """Override the preset's number of layers."""
    n_head: int | None = None
    """Override the preset's number of heads."""
    n_embd: int | None = None
    """Override the preset's width."""
    weight_init: str = "gpt2"
    """How a new model's weights are drawn: ``gpt2`` (normal with std 0.02, residual projections
    scaled by 1/sqrt(2 * layers), as GPT-2 and nanoGPT) or ``torch`` (PyTorch's layer defaults:
    embeddings N(0, 1), linear layers uniform in +-1/sqrt(fan_in), as the book's ``GPTModel``)."""
    eval_every: int = 100
    """Evaluate train and val loss every N steps (0: only at the end)."""
    eval_batches: int = 10
    """Batches per loss estimate."""
    sample_every: str = "epoch"
    """``epoch`` for a sample at each epoch end, a number N for every N steps, or ``0`` for none
    (the first eval, or 10 s of training if sooner, shows one too, so there is text to read early)."""
    prompt: str = "\n"
    """Start context of the periodic samples."""
    sample_tokens: int = 80
    """New tokens in each periodic sample."""
    checkpoint_every: int = 0
    """Write a checkpoint every N steps."""
    keep_last: int = 3
    """Checkpoints kept besides the best-val one."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N or mps."""
    dtype: str = "auto"
    """auto, fp32, bf16 or fp16 (autocast; the weights stay fp32)."""
    compile: bool = False
    """Compile the model with torch.compile."""
    threads: int | None = None
    """Torch CPU threads."""
    seed: int = 1337
    """Seed of every random stream (data order, init, dropout)."""
    out: str | None = None
    """Run directory."""
    resume: str | None = None
    """Run directory or checkpoint file to continue from."""
    init: str | None = None
    """Checkpoint or GPT-2 weights to start from (weights only; a new run)."""
    spike_factor: float = 0.0
    """Pause (or stop, headless) when the loss exceeds this many times its recent mean (0: off)."""
    target_val_loss: float | None = None
    """Pause (dashboard) or stop with a checkpoint (headless) once the val loss is at or below this."""
    max_bad_steps: int = 3
    """Consecutive non-finite steps that pause (or stop) the run."""
    fsdp: bool = False
    """Shard parameters and optimizer state with FSDP under torchrun."""
    log: list[str] = field(default_factory=list)
    """Also log the metrics and samples to ``tensorboard`` (RUN/tensorboard) and/or ``wandb`` (RUN/wandb);
    repeatable. Empty or ``none``: metrics.jsonl only."""
    # Instruction finetuning (``gpt-tui finetune``, engine.instruct); ignored by ``train``.
    max_length: int | None = None
    """Longest instruction example in tokens; longer ones are cut."""
    mask_prompt: bool = True
    """Leave the prompt tokens out of the loss, so only the response is learned."""
    test_responses: int | None = None
    """Test-split records answered after the final checkpoint into RUN/test_responses.json (0: none)."""
    lora_rank: int = 0
    """Rank of the LoRA adapters (0: full finetuning)."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator: adapters are scaled by alpha / rank."""
    lora_layers: str = "attn,mlp"
    """Comma list of the layers that get adapters: attn, mlp, head."""

    def validate(self) -> None:
        """Check every setting; GptTuiError names the first bad one and a value that works."""
        if self.preset not in PRESETS:
            raise GptTuiError(f"unknown preset {self.preset!r}", f"choose one of {', '.join(PRESETS)}")
        if self.tokenizer != "auto":
            check_tokenizer_name(self.tokenizer)
        self._check_ranges()
        if self.weight_init not in WEIGHT_INITS:
            raise GptTuiError(f"unknown --weight-init {self.weight_init!r}", f"choose {' or '.join(WEIGHT_INITS)}")
        if self.optimizer not in OPTIMIZERS:
            raise GptTuiError(f"unknown --optimizer {self.optimizer!r}", f"choose {' or '.join(OPTIMIZERS)}")
        if self.dtype not in ("auto", "fp32", "bf16", "fp16"):
            raise GptTuiError(f"unknown dtype {self.dtype!r}", "choose auto, fp32, bf16 or fp16")
        se = str(self.sample_every)
        if se != "epoch" and not (se.isdigit()):
            raise GptTuiError(f"--sample-every must be 'epoch' or a number, got {se!r}", "use --sample-every epoch")
        if self.log:
            from .loggers import check_loggers

            check_loggers(self.log)

    def _check_ranges(self) -> None:
        positive = {
            "lr": self.lr,
            "batch_size": self.batch_size,
            "grad_accum": self.grad_accum,
            "context": self.context,
            "stride": self.stride,
            "epochs": self.epochs,
            "max_steps": self.max_steps,
            "eval_batches": self.eval_batches,
            "muon_lr": self.muon_lr,
        }
        for name, v in positive.items():
            if v is not None and v <= 0:
                flag = "--" + name.replace("_", "-")
                raise GptTuiError(f"{flag} must be positive, got {v}", f"give {flag} a value above 0")
        for name in ("initial_lr", "min_lr", "weight_decay", "grad_clip", "eval_every", "checkpoint_every"):
            v = getattr(self, name)
            if v is not None and v < 0:
                flag = "--" + name.replace("_", "-")
                raise GptTuiError(f"{flag} must not be negative, got {v}", f"give {flag} a value of 0 or more")
        if not 0.0 < self.val_ratio < 1.0:
            raise GptTuiError(f"--val-ratio must be between 0 and 1, got {self.val_ratio}", "use e.g. --val-ratio 0.1")
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise GptTuiError(f"--{name} must be in [0, 1), got {v}", f"use e.g. --{name} {0.9 if name == 'beta1' else 0.95}")
        if self.keep_last < 1:
            raise GptTuiError(f"--keep-last must be at least 1, got {self.keep_last}", "use --keep-last 1 or more")
        if self.target_val_loss is not None and self.target_val_loss <= 0:
            raise GptTuiError(f"--target-val-loss must be positive, got {self.target_val_loss}",
                              "give the val loss to stop at, e.g. --target-val-loss 1.5")

    def effective_tokenizer(self) -> str:
        if self.tokenizer != "auto":
            return self.tokenizer
        return "char" if self.preset in CHAR_PRESETS else "gpt2"

    def peak_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return PRESET_LR.get(self.preset, GPT2_LR)

    def model_config(self, vocab_size: int) -> ModelConfig:
        return preset_config(
            self.preset,
            vocab_size=vocab_size,
            context_length=self.context,
            dropout=self.dropout,
            qkv_bias=self.qkv_bias,
            tie_weights=self.tie_weights,
            n_layer=self.n_layer,
            n_head=self.n_head,
            n_embd=self.n_embd,
        )

    def effective_context(self) -> int:
        return self.context or PRESETS[self.preset]["context_length"]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        unknown = [k for k in d if k not in names]
        if unknown:
            raise GptTuiError(f"unknown setting(s) {', '.join(unknown)}", "check the names against `gpt-tui train --help`")
        return cls(**d)

    def replace(self, **kw: Any) -> TrainConfig:
        return dataclasses.replace(self, **kw)


LIST_SETTINGS = ("data", "log")
"""Repeatable flags: given as lists, an empty one counts as not given."""


def config_from_settings(flags: dict[str, Any], base: dict[str, Any] | None = None,
                         defaults: dict[str, Any] | None = None) -> tuple[TrainConfig, frozenset[str]]:
    """A checked TrainConfig from ``base`` (a TOML file's settings) overlaid with the given ``flags``
    (None: not given), plus the set of settings given explicitly. ``defaults`` (e.g. finetuning's)
    apply where nothing was given."""
    merged: dict[str, Any] = dict(base or {})
    for k, v in flags.items():
        if v is None or (k in LIST_SETTINGS and not v):
            continue
        merged[k] = list(v) if k in LIST_SETTINGS else v
    explicit = frozenset(merged)
    for k, v in (defaults or {}).items():
        if k not in explicit and not (k == "epochs" and "max_steps" in explicit):
            merged[k] = v
    cfg = TrainConfig.from_dict(merged)
    cfg.validate()
    return cfg, explicit


def load_toml(path: str) -> dict[str, Any]:
    """Settings from a TOML file (top level, or a ``[train]`` table); keys use _ or -."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise GptTuiError(f"config file {path} does not exist", "check the path given to --config") from None
    except tomllib.TOMLDecodeError as e:
        raise GptTuiError(f"config file {path} is not valid TOML ({e})", "fix the file's syntax") from None
    if "train" in raw and isinstance(raw["train"], dict):
        raw = raw["train"]
    out = {k.replace("-", "_"): v for k, v in raw.items()}
    for k in LIST_SETTINGS:
        if k in out and isinstance(out[k], str):
            out[k] = [out[k]]
    TrainConfig.from_dict(out)  # names checked here
    return out


# Flags that may differ between a checkpoint and the resumed run, and are reported.
SAFE_ON_RESUME = {
    "epochs", "max_steps", "eval_every", "eval_batches", "sample_every", "prompt", "sample_tokens",
    "checkpoint_every", "keep_last", "device", "threads", "out", "resume", "spike_factor",
    "max_bad_steps", "compile", "lr", "muon_lr", "min_lr", "grad_clip", "data", "text_field", "fsdp",
    "test_responses", "target_val_loss",
    "log",
}

CPU_THREADS_TEXT = "every core headless; beside the dashboard, the cores not busy (at least one)"
"""What :func:`engine.device.default_threads` picks, in words (for ``--help``)."""

DEMO_EPOCHS = 2
"""Epochs of the embedded demo corpus when neither --epochs nor --max-steps is given."""
DEMO_LR = 2e-3
"""The tiny preset's learning rate on the embedded demo corpus when --lr is not given: 2 epochs at 2e-3
end at val loss 1.79 where 3 at 1e-3 end at 1.72 (and 2 at 1e-3 at 1.86), in two thirds of the time."""


def demo_defaults(preset: str | None) -> dict[str, Any]:
    """``gpt-tui train``'s defaults on the embedded demo corpus (no --data): about a minute on a 2-core CPU."""
    d: dict[str, Any] = {"epochs": DEMO_EPOCHS}
    if (preset or "tiny") == "tiny":
        d["lr"] = DEMO_LR
    return d

FINETUNE_DEFAULTS: dict[str, Any] = {
    "lr": 5e-5, "dropout": 0.0, "epochs": 2, "batch_size": 8, "eval_every": 5, "eval_batches": 5,
    "sample_tokens": 256, "tokenizer": "gpt2",
}
"""Instruction finetuning's defaults where they differ from pretraining (LLMs-from-scratch chapter 7)."""
LORA_LR = 5e-3
"""Finetuning's default learning rate with LoRA adapters (they start from zero and need a far larger rate
than full finetuning). Measured with ``benchmarks/bench_lora.py --lora-lrs``: rank 16 on attn,mlp of a
small pretrained GPT-2-vocabulary model on instruction-data.json, finetuning's default schedule, val loss
after 232 steps (2 epochs): 1e-3 7.92, 2e-3 7.84, 5e-3 7.77, 1e-2 7.74; after 60 steps 2e-4 8.82,
5e-4 8.51, 1e-3 8.33, 2e-3 8.15, 5e-3 7.98, 1e-2 7.91. The best rate was the largest tried, on a weak
model; 5e-3 is within 0.03 of it at the default length and keeps a margin from the top."""


def finetune_defaults(lora_rank: int) -> dict[str, Any]:
    """The defaults of ``gpt-tui finetune`` (with ``--lora-rank R``: the adapters' learning rate)."""
    d = dict(FINETUNE_DEFAULTS)
    if lora_rank > 0:
        d["lr"] = LORA_LR
    return d


# ------------------------------------------------------------------ live changes
@dataclass
class LiveChange:
    """A setting changed while the run trains (``gpt-tui set``, the dashboard)."""

    setting: str
    """The TrainConfig field."""
    new: Any
    old: Any = None
    step: int = 0
    """Steps done when it took effect (it applies from step ``step + 1``)."""
    source: str = "dashboard"

    @property
    def flag(self) -> str:
        return self.setting.replace("_", "-")

    def describe(self) -> str:
        return f"{self.flag} {fmt_setting(self.old)} -> {fmt_setting(self.new)}"


def fmt_setting(v: Any) -> str:
    if v is None:
        return "off"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) >= 1e-3 else f"{v:.2e}"
    return str(v)


def _number(name: str, raw: str, kind: type, low: float, strict: bool) -> Any:
    try:
        v = kind(raw)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise GptTuiError(f"{name} must be {what}, got {raw!r}", f"e.g. {name}={'50' if kind is int else '3e-4'}") from None
    if v < low or (strict and v == low) or v != v:
        bound = f"above {low:g}" if strict else f"{low:g} or more"
        raise GptTuiError(f"{name} must be {bound}, got {raw}", f"give {name} a value {bound}")
    return v


LIVE_SETTINGS: dict[str, str] = {
    "lr": "peak learning rate (the schedule continues from it); x0.5 scales it",
    "eval_every": "evaluate every N steps (0: only at the end)",
    "sample_every": "sample every N steps, or 'epoch', or 0",
    "grad_clip": "gradient-norm clip (0: off)",
    "spike_factor": "spike guard: pause/stop when the loss exceeds this x its recent mean (0: off)",
    "max_bad_steps": "non-finite steps in a row that pause/stop the run",
    "target_val_loss": "pause/stop once the val loss reaches this ('off' clears it)",
}
"""What ``gpt-tui set RUN NAME=VALUE`` and the dashboard may change mid-run (TrainConfig fields)."""


def parse_live_change(cfg: TrainConfig, setting: str, value: str) -> Any:
    """The new value of a live change of ``cfg``, checked; GptTuiError names what is refused."""
    name = setting.strip().replace("-", "_")
    flag = name.replace("_", "-")
    raw = str(value).strip()
    if name not in LIVE_SETTINGS:
        known = {f.name for f in fields(TrainConfig)}
        why = "it cannot change while the run trains" if name in known else "there is no such setting"
        raise GptTuiError(f"cannot change {flag} live: {why}",
                          f"settings that can: {', '.join(k.replace('_', '-') for k in LIVE_SETTINGS)}")
    if name == "lr":
        if raw.lower().startswith(("x", "*")):
            return cfg.peak_lr() * _number("the lr factor", raw[1:], float, 0.0, True)
        return _number(flag, raw, float, 0.0, True)
    if name in ("eval_every",):
        return _number(flag, raw, int, 0, False)
    if name == "max_bad_steps":
        return _number(flag, raw, int, 1, False)
    if name == "sample_every":
        if raw == "epoch":
            return raw
        return str(_number(flag, raw, int, 0, False))
    if name == "target_val_loss":
        if raw.lower() in ("off", "none", "clear", ""):
            return None
        return _number(flag, raw, float, 0.0, True)
    return _number(flag, raw, float, 0.0, False)  # grad_clip, spike_factor


# ------------------------------------------------------------------ defaults, as help shows them
def default_text(name: str) -> str:
    """The default of a setting in words, from the values the code uses (``--help`` shows it)."""
    special = {
        "data": "the embedded python-docs corpus",
        "tokenizer": f"auto: char for {' and '.join(CHAR_PRESETS)}, gpt2 for the others",
        "context": "the preset's (" + ", ".join(f"{k} {v['context_length']}" for k, v in PRESETS.items()) + ")",
        "stride": "the context (no overlap)",
        "epochs": f"1; {DEMO_EPOCHS} on the embedded demo corpus",
        "lr": ", ".join(f"{v:g} for {k}" for k, v in PRESET_LR.items()) + f", {GPT2_LR:g} for the GPT-2 sizes"
              + f"; {DEMO_LR:g} for tiny on the embedded demo corpus",
        "min_lr": f"lr / {MIN_LR_DIVISOR}",
        "warmup_steps": f"{WARMUP_SHARE:.0%} of the run",
        "dropout": "the preset's", "qkv_bias": "the preset's", "tie_weights": "the preset's",
        "n_layer": "the preset's", "n_head": "the preset's", "n_embd": "the preset's",
        "threads": CPU_THREADS_TEXT,
        "out": "runs/<timestamp>",
        "max_length": "the model's context",
        "test_responses": "as many as fit in a quarter of the training time (at least 20 s)",
        "max_steps": "none: --epochs decides", "resume": "none", "init": "none", "target_val_loss": "none",
        "checkpoint_every": "0: at the end, on a stop and on request",
        "log": "none beyond metrics.jsonl",
        "prompt": "a new line",
    }
    if name in special:
        return special[name]
    default = next(f.default for f in fields(TrainConfig) if f.name == name)
    if isinstance(default, bool):
        return "on" if default else "off"
    return f"{default:g}" if isinstance(default, float) else str(default)


def field_docs() -> dict[str, str]:
    """Each TrainConfig field's attribute docstring, as one line (the flags' help)."""
    import ast
    import inspect
    import re

    tree = ast.parse(inspect.getsource(TrainConfig))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for stmt, nxt in zip(body, body[1:], strict=False):
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(nxt, ast.Expr) \
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
            docs[stmt.target.id] = re.sub(r"\s+", " ", nxt.value.value.replace("``", "")).strip()
    return docs

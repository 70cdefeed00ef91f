"""Run configuration: one dataclass, one field per flag, saved with every run."""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .errors import GptTuiError
from .model import PRESETS, WEIGHT_INITS, ModelConfig, preset_config
from .tokenizer import check_tokenizer_name


@dataclass
class TrainConfig:
    """Everything a training run needs; ``gpt-tui train`` flags map 1:1 onto these fields."""

    data: list[str] = field(default_factory=list)
    """Files, folders or named corpora (``python-docs``, ``the-verdict``, ``tinyshakespeare``).
    Empty: the embedded default corpus."""
    text_field: str = "text"
    """Field holding each document's text in .jsonl/.jsonl.gz records and parquet shards."""
    preset: str = "tiny"
    """Model size: bigram, tiny, small, gpt2, gpt2-medium, gpt2-large, gpt2-xl."""
    tokenizer: str = "auto"
    """``gpt2`` (BPE, 50,257 ids), ``char`` (one id per character of the corpus), or ``auto``:
    char for the ``tiny`` and ``bigram`` presets, gpt2 for the others."""
    context: int | None = None
    """Tokens per training window (default: the preset's context length)."""
    stride: int | None = None
    """Distance between window starts (default: the context, i.e. no overlap)."""
    val_ratio: float = 0.1
    """Fraction of the tokens (at the end of the corpus) held out for validation."""
    batch_size: int = 8
    """Windows per micro-batch (per process under torchrun)."""
    grad_accum: int = 1
    """Micro-batches whose gradients are summed before one optimizer step."""
    epochs: int | None = None
    """Passes over the training windows (default 1 when --max-steps is not given)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (with --epochs: whichever comes first)."""
    lr: float | None = None
    """Peak learning rate, reached after warm-up (default: 1e-3 for tiny and small, 1e-2 for
    bigram, 4e-4 as in the book for the GPT-2 sizes)."""
    initial_lr: float = 0.0
    """Learning rate at step 0; warm-up goes linearly from here to --lr."""
    min_lr: float | None = None
    """Learning rate at the end of the cosine decay (default lr/10; equal to --lr for a constant rate)."""
    warmup_steps: int | None = None
    """Linear warm-up steps (default: 5% of the run)."""
    weight_decay: float = 0.1
    """AdamW weight decay, applied to matrices only."""
    beta1: float = 0.9
    """AdamW beta1 (decay of the gradient's running mean)."""
    beta2: float = 0.95
    """AdamW beta2 (decay of the squared gradient's running mean; nanoGPT's 0.95, the book and
    PyTorch use 0.999)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 turns clipping off)."""
    dropout: float | None = None
    """Dropout rate (default: the preset's)."""
    qkv_bias: bool | None = None
    """Bias on the attention's query/key/value projection (default: the preset's)."""
    tie_weights: bool | None = None
    """Tie the LM head to the token embedding (default: the preset's)."""
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
    """``epoch`` for a sample at each epoch end, a number N for every N steps, or ``0`` for none."""
    prompt: str = "\n"
    """Start context of the periodic samples."""
    sample_tokens: int = 80
    """New tokens in each periodic sample."""
    checkpoint_every: int = 0
    """Write a checkpoint every N steps (0: only at the end, on pause-save and on stop)."""
    keep_last: int = 3
    """Checkpoints kept besides the best-val one."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N or mps."""
    dtype: str = "auto"
    """auto, fp32, bf16 or fp16 (autocast; the weights stay fp32)."""
    compile: bool = False
    """Compile the model with torch.compile."""
    threads: int | None = None
    """Torch intra-op threads (default: chosen for the device and the UI)."""
    seed: int = 1337
    """Seed of every random stream (data order, init, dropout)."""
    out: str | None = None
    """Run directory (default: runs/<timestamp>)."""
    resume: str | None = None
    """Run directory or checkpoint file to continue from."""
    init: str | None = None
    """Checkpoint or GPT-2 weights to start from (weights only; a new run)."""
    spike_factor: float = 0.0
    """Pause (or stop, headless) when the loss exceeds this many times its recent mean (0: off)."""
    max_bad_steps: int = 3
    """Consecutive non-finite steps that pause (or stop) the run."""
    fsdp: bool = False
    """Shard parameters and optimizer state with FSDP under torchrun."""
    log: list[str] = field(default_factory=list)
    """Also log the metrics and samples to ``tensorboard`` (RUN/tensorboard) and/or ``wandb`` (RUN/wandb);
    repeatable. Empty or ``none``: metrics.jsonl only."""
    # Instruction finetuning (``gpt-tui finetune``, engine.instruct); ignored by ``train``.
    max_length: int | None = None
    """Longest instruction example in tokens; longer ones are cut (default: the model's context)."""
    mask_prompt: bool = True
    """Leave the prompt tokens out of the loss, so only the response is learned."""
    test_responses: int | None = None
    """Test-split records answered at the end into RUN/test_responses.json (default: all; 0: none)."""
    lora_rank: int = 0
    """Rank of the LoRA adapters (0: full finetuning)."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator: adapters are scaled by alpha / rank."""
    lora_layers: str = "attn,mlp"
    """Comma list of the layers that get adapters: attn, mlp, head."""

    def validate(self) -> None:
        if self.preset not in PRESETS:
            raise GptTuiError(f"unknown preset {self.preset!r}", f"choose one of {', '.join(PRESETS)}")
        if self.tokenizer != "auto":
            check_tokenizer_name(self.tokenizer)
        positive = {
            "lr": self.lr,
            "batch_size": self.batch_size,
            "grad_accum": self.grad_accum,
            "context": self.context,
            "stride": self.stride,
            "epochs": self.epochs,
            "max_steps": self.max_steps,
            "eval_batches": self.eval_batches,
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
        if self.weight_init not in WEIGHT_INITS:
            raise GptTuiError(f"unknown --weight-init {self.weight_init!r}", f"choose {' or '.join(WEIGHT_INITS)}")
        if self.dtype not in ("auto", "fp32", "bf16", "fp16"):
            raise GptTuiError(f"unknown dtype {self.dtype!r}", "choose auto, fp32, bf16 or fp16")
        se = str(self.sample_every)
        if se != "epoch" and not (se.isdigit()):
            raise GptTuiError(f"--sample-every must be 'epoch' or a number, got {se!r}", "use --sample-every epoch")
        if self.keep_last < 1:
            raise GptTuiError(f"--keep-last must be at least 1, got {self.keep_last}", "use --keep-last 1 or more")
        if self.log:
            from .loggers import check_loggers

            check_loggers(self.log)

    def effective_tokenizer(self) -> str:
        if self.tokenizer != "auto":
            return self.tokenizer
        return "char" if self.preset in ("tiny", "bigram") else "gpt2"

    def peak_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return {"bigram": 1e-2, "tiny": 1e-3, "small": 1e-3}.get(self.preset, 4e-4)

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
    if "data" in out and isinstance(out["data"], str):
        out["data"] = [out["data"]]
    TrainConfig.from_dict(out)  # names checked here
    return out


# Flags that may differ between a checkpoint and the resumed run, and are reported.
SAFE_ON_RESUME = {
    "epochs", "max_steps", "eval_every", "eval_batches", "sample_every", "prompt", "sample_tokens",
    "checkpoint_every", "keep_last", "device", "threads", "out", "resume", "spike_factor",
    "max_bad_steps", "compile", "lr", "min_lr", "grad_clip", "data", "text_field", "fsdp", "test_responses",
    "log",
}

"""The model's architecture as plain settings: :class:`ModelConfig` and the presets (no torch needed)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from .errors import GptTuiError

WEIGHT_INITS = ("gpt2", "torch")
"""How a new model's weights are drawn (see ``TrainConfig.weight_init``)."""


@dataclass
class ModelConfig:
    """Architecture of a GPT model."""

    vocab_size: int = 50257
    """Number of token ids the embedding and head cover."""
    context_length: int = 256
    """Longest sequence the position table covers."""
    n_layer: int = 12
    """Number of transformer blocks."""
    n_head: int = 12
    """Attention heads per block; must divide ``n_embd``."""
    n_embd: int = 768
    """Width of the residual stream."""
    dropout: float = 0.1
    """Dropout on embeddings, attention and residual branches (0 to turn off)."""
    qkv_bias: bool = False
    """Bias on the query/key/value projection (GPT-2 weights have it)."""
    tie_weights: bool = False
    """Share the token embedding matrix with the LM head."""
    arch: str = "gpt"
    """``gpt`` for the transformer, ``bigram`` for the embedding + linear-head baseline."""

    def validate(self) -> None:
        if self.arch not in ("gpt", "bigram"):
            raise GptTuiError(f"unknown architecture {self.arch!r}", "use 'gpt' or 'bigram'")
        for name in ("vocab_size", "context_length", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) <= 0:
                raise GptTuiError(f"{name} must be positive, got {getattr(self, name)}", f"set a positive {name}")
        if self.arch == "gpt" and self.n_embd % self.n_head:
            raise GptTuiError(
                f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}",
                "choose n_embd as a multiple of n_head",
            )
        if not 0.0 <= self.dropout < 1.0:
            raise GptTuiError(f"dropout must be in [0, 1), got {self.dropout}", "set --dropout between 0 and 1")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# The book's sizes (LLMs-from-scratch ch04) plus CPU presets.
PRESETS: dict[str, dict] = {
    "bigram": dict(arch="bigram", n_layer=1, n_head=1, n_embd=32, context_length=8, dropout=0.0),
    "tiny": dict(n_layer=2, n_head=4, n_embd=128, context_length=64, dropout=0.0),
    "small": dict(n_layer=6, n_head=6, n_embd=384, context_length=256, dropout=0.2),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, context_length=1024, dropout=0.1),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, context_length=1024, dropout=0.1),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280, context_length=1024, dropout=0.1),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600, context_length=1024, dropout=0.1),
}


def preset_config(name: str, **overrides) -> ModelConfig:
    """Model config for a preset name, with overrides (``None`` values are ignored)."""
    if name not in PRESETS:
        raise GptTuiError(f"unknown preset {name!r}", f"choose one of {', '.join(PRESETS)}")
    d = dict(PRESETS[name])
    d.update({k: v for k, v in overrides.items() if v is not None})
    cfg = ModelConfig.from_dict(d)
    cfg.validate()
    return cfg

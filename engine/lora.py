"""Low-rank adaptation (LoRA): frozen base weights plus small trainable adapters.

:class:`LoRALinear` wraps an ``nn.Linear`` ``W`` and computes ``W x + (alpha / rank) * B A x``
with ``A`` (rank x in) initialised like a linear layer and ``B`` (out x rank) zero, so a fresh
adapter leaves the model's output unchanged (LLMs-from-scratch appendix E; Hu et al. 2021).
:func:`apply_lora` freezes every base parameter and wraps the chosen layers:

* ``attn``: each block's fused query/key/value projection and output projection,
* ``mlp``: each block's two feed-forward layers,
* ``head``: the output layer (tied to the token embedding in GPT-2; merging unties it).

A LoRA checkpoint (``kind: "lora"``) holds only the adapters plus the path and sha256 of the
base weights; ``engine.weights.model_from_checkpoint`` rebuilds base + adapters from it, and
:func:`merge_lora` folds the adapters into plain ``nn.Linear`` layers.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import CheckpointError, GptTuiError
from .model import GPT, describe_shape_mismatch

LAYER_GROUPS: dict[str, tuple[str, ...]] = {
    "attn": ("attn.qkv", "attn.proj"),
    "mlp": ("mlp.fc", "mlp.proj"),
    "head": ("head",),
}
DEFAULT_LAYERS = "attn,mlp"


class LoRALinear(nn.Module):
    """``base(x) + (alpha / rank) * x A^T B^T`` with ``base`` frozen."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        if rank <= 0:
            raise GptTuiError(f"LoRA rank must be positive, got {rank}", "use e.g. --lora-rank 16")
        self.base = base
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        w = base.weight
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=w.device, dtype=w.dtype))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scaling

    def delta(self) -> torch.Tensor:
        """The adapter as a weight update: ``scaling * B A`` (out x in)."""
        return (self.lora_b @ self.lora_a) * self.scaling

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the adapter folded into a new weight (the base is not changed)."""
        b = self.base
        lin = nn.Linear(b.in_features, b.out_features, bias=b.bias is not None, device=b.weight.device,
                        dtype=b.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(b.weight + self.delta().to(b.weight.dtype))
            if b.bias is not None:
                lin.bias.copy_(b.bias)
        return lin

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}"


def parse_layers(spec: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """``"attn,mlp"`` -> ("attn", "mlp"), checked against the known groups."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for item in (s.strip() for s in items):
        if not item:
            continue
        if item not in LAYER_GROUPS:
            raise GptTuiError(f"unknown LoRA layer group {item!r}", f"use a comma list of {', '.join(LAYER_GROUPS)}")
        if item not in out:
            out.append(item)
    if not out:
        raise GptTuiError("--lora-layers is empty", f"use a comma list of {', '.join(LAYER_GROUPS)}")
    return tuple(out)


def _targets(layers: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(s for group in layers for s in LAYER_GROUPS[group])


def _matches(name: str, targets: tuple[str, ...]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def apply_lora(model: nn.Module, rank: int, alpha: float, layers: str | tuple[str, ...] = DEFAULT_LAYERS) -> list[str]:
    """Freeze all of ``model`` and wrap the chosen linear layers with adapters; returns their names."""
    if rank <= 0:
        raise GptTuiError(f"--lora-rank must be positive, got {rank}", "use e.g. --lora-rank 16")
    if alpha <= 0:
        raise GptTuiError(f"--lora-alpha must be positive, got {alpha}", "use e.g. --lora-alpha 16")
    targets = _targets(parse_layers(layers))
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if isinstance(child, nn.Linear) and _matches(full, targets):
                setattr(parent, child_name, LoRALinear(child, rank, alpha))
                wrapped.append(full)
    if not wrapped:
        raise GptTuiError(f"no layer of the model matches --lora-layers {','.join(parse_layers(layers))}",
                          "the bigram model has only a head: use --lora-layers head")
    return wrapped


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors (``...lora_a`` / ``...lora_b``)."""
    return {k: v for k, v in model.state_dict().items() if k.endswith((".lora_a", ".lora_b"))}


def lora_mismatch(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Differences between the model's adapters and a saved adapter state (empty when they fit)."""
    return describe_shape_mismatch(model, state, own=lora_state_dict(model), what=" adapters", limit=3)


def load_lora_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    diff = lora_mismatch(model, state)
    if diff:
        raise CheckpointError(f"LoRA adapters do not fit the model ({'; '.join(diff[:3])})",
                              "use the rank, alpha and layers the adapters were trained with")
    model.load_state_dict(state, strict=False)


def merge_lora(model: GPT) -> GPT:
    """Fold every adapter into its layer (in place); returns the plain GPT.

    A merged head no longer equals the token embedding, so a tied model is untied.
    """
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, child_name, child.merged())
                if child_name == "head" and not parent_name and model.cfg.tie_weights:
                    model.cfg.tie_weights = False
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each shared tensor counted once."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def lora_info(rank: int, alpha: float, layers: str | tuple[str, ...], base: dict[str, str]) -> dict[str, Any]:
    """What a LoRA checkpoint records about its adapters and base."""
    return {"rank": int(rank), "alpha": float(alpha), "layers": ",".join(parse_layers(layers)),
            "base": base["path"], "base_sha256": base["sha256"], "base_format": base.get("format", "")}

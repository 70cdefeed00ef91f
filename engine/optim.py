"""Optimizers: AdamW (the default) or Muon for the transformer blocks' matrices with AdamW for the rest.

``--optimizer muon`` trains every 2-D weight inside the transformer blocks (attention and MLP
projections) with PyTorch's :class:`torch.optim.Muon` and everything else (token and position
embeddings, the LM head, LayerNorms, biases) with AdamW, as nanochat and modded-nanogpt do: Muon
orthogonalizes each matrix's momentum (Newton-Schulz iterations), which suits hidden-layer
matrices but not embeddings, the head or vectors.

Each param group carries ``lr_scale``, its peak learning rate over the run's (``--lr``): the
trainer sets ``lr = lr_at(step) * lr_scale`` every step, so warm-up and decay shape every group
alike. AdamW groups have 1.0 (plain AdamW runs have none, read as 1.0); the Muon group has
``--muon-lr / --lr``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.nn as nn

from .config import OPTIMIZERS, TrainConfig
from .errors import GptTuiError

MUON_MOMENTUM = 0.95
"""Momentum of Muon's (Nesterov) gradient average, torch's and nanochat's default."""


def muon_param_names(model: nn.Module) -> list[str]:
    """Names of the trainable parameters Muon takes: the 2-D weights inside ``model.blocks``."""
    out = []
    for name, p in model.named_parameters():
        if p.requires_grad and p.dim() == 2 and name.startswith("blocks."):
            out.append(name)
    return out


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The run's optimizer over ``model``'s trainable parameters, as ``cfg.optimizer`` says.

    ``adamw``: :meth:`engine.model.GPT.configure_optimizer` (decay on matrices only, fused where
    available). ``muon``: a :class:`MuonAdamW` holding an AdamW over embeddings, head, norms and
    biases and a Muon over the blocks' matrices.
    """
    peak = cfg.peak_lr()
    if cfg.optimizer == "adamw":
        return model.configure_optimizer(peak, cfg.weight_decay, betas=(cfg.beta1, cfg.beta2))
    if cfg.optimizer != "muon":
        raise GptTuiError(f"unknown --optimizer {cfg.optimizer!r}", f"choose {' or '.join(OPTIMIZERS)}")
    names = set(muon_param_names(model))
    if not names:
        raise GptTuiError(
            "--optimizer muon trains the matrices of the transformer blocks, and this model has none to train",
            "use --optimizer adamw",
        )
    muon_lr = cfg.muon_lr
    matrices, adam_decay, adam_no_decay = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name in names:
            matrices.append(p)
        elif p.dim() >= 2:
            adam_decay.append(p)
        else:
            adam_no_decay.append(p)
    groups = [{"params": adam_decay, "weight_decay": cfg.weight_decay, "lr_scale": 1.0},
              {"params": adam_no_decay, "weight_decay": 0.0, "lr_scale": 1.0}]
    groups = [g for g in groups if g["params"]]
    parts: list[torch.optim.Optimizer] = []
    if groups:  # none when only adapters in the blocks train (LoRA on attn and mlp)
        fused = next(model.parameters()).device.type in ("cuda", "cpu")
        parts.append(torch.optim.AdamW(groups, lr=peak, betas=(cfg.beta1, cfg.beta2), **({"fused": True} if fused else {})))
    # Decoupled weight decay shrinks a weight by lr * decay per step. Muon's matrices get the same
    # shrink per step as AdamW's (--weight-decay at --lr), so one flag means one thing for both.
    parts.append(torch.optim.Muon(
        [{"params": matrices, "lr_scale": muon_lr / peak}],
        lr=muon_lr, weight_decay=cfg.weight_decay * peak / muon_lr, momentum=MUON_MOMENTUM,
        nesterov=True, adjust_lr_fn="original",
    ))
    return MuonAdamW(*parts)


class _JointState(Mapping):
    """The per-parameter state of several optimizers as one read-only mapping (looked up live)."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self._optimizers = optimizers

    def __getitem__(self, p: torch.Tensor) -> Any:
        for opt in self._optimizers:
            if p in opt.state:
                return opt.state[p]
        raise KeyError(p)

    def __contains__(self, p: object) -> bool:
        return any(p in opt.state for opt in self._optimizers)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for opt in self._optimizers:
            yield from opt.state

    def __len__(self) -> int:
        return sum(len(opt.state) for opt in self._optimizers)


class MuonAdamW(torch.optim.Optimizer):
    """An AdamW and a Muon stepped together, behaving as one ``torch.optim.Optimizer``.

    ``param_groups`` lists the AdamW groups, then the Muon group (the same dicts the two use, so
    setting a group's ``lr`` reaches its optimizer; the first group's ``lr`` is the run's, as
    the trainer reports it). ``state_dict`` is in the plain
    ``torch.optim`` layout (parameters numbered across both in that order; plain dicts, lists
    and tensors, loadable with ``torch.load(weights_only=True)``), so FSDP's state-dict helpers
    and the checkpoint code treat it like any single optimizer.
    """

    def __init__(self, *optimizers: torch.optim.Optimizer) -> None:
        self.optimizers = list(optimizers)
        super().__init__([g for opt in self.optimizers for g in opt.param_groups], {})
        self.state = _JointState(self.optimizers)  # type: ignore[assignment]

    def _relink(self) -> None:
        self.param_groups = [g for opt in self.optimizers for g in opt.param_groups]
        self.state = _JointState(self.optimizers)  # type: ignore[assignment]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.optimizers:
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        state: dict[int, Any] = {}
        groups: list[dict[str, Any]] = []
        offset = 0
        for opt in self.optimizers:
            sd = opt.state_dict()
            state.update({offset + int(i): s for i, s in sd["state"].items()})
            groups += [dict(g, params=[offset + int(i) for i in g["params"]]) for g in sd["param_groups"]]
            offset += sum(len(g["params"]) for g in opt.param_groups)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Load the saved moments and step counts; hyperparameters stay as built from the config.

        The groups' settings (``lr_scale``, weight decay, betas...) come from the run's config,
        which on resume is the checkpoint's plus the changes allowed (a new ``--lr`` or
        ``--muon-lr`` thus takes effect).
        """
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"the saved optimizer has {len(saved_groups)} parameter groups, this one "
                             f"{len(self.param_groups)}")
        offset = 0
        start = 0
        for opt in self.optimizers:
            n_groups = len(opt.param_groups)
            mine = saved_groups[start:start + n_groups]
            n_params = sum(len(g["params"]) for g in opt.param_groups)
            ids = {int(i) for g in mine for i in g["params"]}
            sub = {
                "state": {int(i) - offset: s for i, s in state_dict["state"].items() if int(i) in ids},
                "param_groups": [
                    {**{k: v for k, v in g.items() if k != "params"}, "params": [int(i) - offset for i in s["params"]]}
                    for g, s in zip(opt.param_groups, mine, strict=True)
                ],
            }
            opt.load_state_dict(sub)
            start += n_groups
            offset += n_params
        self._relink()

"""What varies in how a model is trained and saved: plain, LoRA adapters, or spread over ranks.

The trainer holds one :class:`Strategy` and calls it at fixed points: after the model is built
(:meth:`~Strategy.prepare`), to wrap it for training (:meth:`~Strategy.wrap`), around each
micro-step (:meth:`~Strategy.no_sync`), and to save or restore model and optimizer state.

* :class:`Strategy`: full weights in one process.
* :class:`LoRAStrategy`: a frozen base plus adapters; checkpoints hold the adapters only.
* ``engine.distributed.DDPStrategy`` / ``FSDPStrategy``: the same under torchrun, around an inner
  strategy (plain or LoRA) that keeps deciding what the weights are.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from .errors import GptTuiError
from .model import GPT, describe_shape_mismatch

if TYPE_CHECKING:
    from .checkpoint import Checkpoint
    from .config import TrainConfig

Log = Callable[[str], None]


class Strategy:
    """Full weights, one process: the plain case every other strategy refines."""

    kind = "full"
    """What checkpoints hold: ``full`` or ``lora``."""

    def prepare(self, model: GPT, resume: Checkpoint | None, log: Log) -> GPT:
        """The model to train, from the one just built (LoRA wraps layers here)."""
        return model

    def wrap(self, model: GPT, device: torch.device) -> torch.nn.Module:
        """The module the training step calls (DDP and FSDP wrap it)."""
        return model

    def no_sync(self, module: torch.nn.Module, last_micro: bool) -> contextlib.AbstractContextManager:
        """Around a micro-step's backward: skip the gradient reduction before the last one."""
        return contextlib.nullcontext()

    def reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        """A scalar averaged over the ranks (itself in one process)."""
        return value

    def plain(self, value: torch.Tensor) -> torch.Tensor:
        """A plain tensor of a value the step computed (FSDP's grad norm is a DTensor)."""
        return value

    def model_state(self, model: GPT) -> dict[str, torch.Tensor]:
        return model.state_dict()

    def mismatch(self, model: GPT, state: dict[str, torch.Tensor]) -> list[str]:
        """How a saved model state differs from the live model (empty when it fits)."""
        return describe_shape_mismatch(model, state)

    def load_model_state(self, model: GPT, state: dict[str, torch.Tensor]) -> None:
        model.load_state_dict(state)

    def optimizer_state(self, model: GPT, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return optimizer.state_dict()

    def load_optimizer_state(self, model: GPT, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        optimizer.load_state_dict(state)

    def lora_info(self) -> dict[str, Any] | None:
        """What a LoRA checkpoint records about its adapters and base (None otherwise)."""
        return None

    def translate_error(self, error: BaseException) -> Exception | None:
        """A clearer error for one raised by a training step (a lost rank), or None."""
        return None


class LoRAStrategy(Strategy):
    """A frozen base with rank-R adapters; checkpoints hold the adapters and name the base."""

    kind = "lora"

    def __init__(self, rank: int, alpha: float, layers: str, init: str | None) -> None:
        self.rank, self.alpha, self.layers, self.init = rank, alpha, layers, init
        self.base: dict[str, str] | None = None

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> LoRAStrategy:
        if cfg.fsdp:
            raise GptTuiError("LoRA adapters are not supported with --fsdp", "drop --fsdp (DDP is used instead)")
        return cls(cfg.lora_rank, cfg.lora_alpha, cfg.lora_layers, cfg.init)

    def prepare(self, model: GPT, resume: Checkpoint | None, log: Log) -> GPT:
        from .lora import apply_lora, count_parameters
        from .weights import load_base, source_identity

        if resume is not None:
            info = resume.lora
            if resume.kind != "lora" or not isinstance(info, dict):
                raise GptTuiError(f"{resume.path} holds full weights, not LoRA adapters",
                                  "resume it without LoRA settings, or start a new LoRA run with --init")
            model = load_base(info, model.cfg, dropout=model.cfg.dropout)
            self.base = {"path": info["base"], "sha256": info["base_sha256"], "format": info.get("base_format", "")}
        else:
            if not self.init:
                raise GptTuiError("LoRA adapters need base weights", "give --init CHECKPOINT_OR_GPT2_FOLDER")
            self.base = source_identity(self.init)
        wrapped = apply_lora(model, self.rank, self.alpha, self.layers)
        trainable, total = count_parameters(model)
        log(f"LoRA rank {self.rank}, alpha {self.alpha:g} on {len(wrapped)} layers ({self.layers}): "
            f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)")
        return model

    def model_state(self, model: GPT) -> dict[str, torch.Tensor]:
        from .lora import lora_state_dict

        return lora_state_dict(model)

    def mismatch(self, model: GPT, state: dict[str, torch.Tensor]) -> list[str]:
        from .lora import lora_mismatch

        return lora_mismatch(model, state)

    def load_model_state(self, model: GPT, state: dict[str, torch.Tensor]) -> None:
        from .lora import load_lora_state

        load_lora_state(model, state)

    def lora_info(self) -> dict[str, Any] | None:
        from .lora import lora_info

        assert self.base is not None, "prepare() sets the base"
        return lora_info(self.rank, self.alpha, self.layers, self.base)


def strategy_for(cfg: TrainConfig) -> Strategy:
    """The one-process strategy a config asks for (LoRA when ``lora_rank`` > 0)."""
    return LoRAStrategy.from_config(cfg) if cfg.lora_rank > 0 else Strategy()

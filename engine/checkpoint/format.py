"""What a checkpoint holds: the one place that knows the keys of its payload and of its meta.json.

A checkpoint is two files (see :mod:`.io` for how they are written and checked):

* ``step-N.pt``: a :class:`Checkpoint` as a dict of tensors and plain values (``torch.save``;
  read back with ``torch.load(weights_only=True)``);
* ``step-N.meta.json``: a :class:`CheckpointMeta`, plain JSON that a UI reads without torch,
  plus the storage fields :mod:`.io` adds (``file``, ``sha256``, ``bytes``, ``saved_at``).

Versions (the ``format`` key of both files):

* ``gpt-tui/1``: the first release.
* ``gpt-tui/2``: adds ``changes`` (the live changes of the run so far, replayed on resume) and drops
  ``batch_in_epoch`` (it repeated ``data.step_in_epoch``).

:func:`upgrade` brings a payload of any readable version to today's, so every reader sees one shape.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError
from . import io

if TYPE_CHECKING:
    import torch

FORMAT = "gpt-tui/2"


def _upgrade_1(obj: dict[str, Any]) -> dict[str, Any]:
    obj = dict(obj)
    obj.pop("batch_in_epoch", None)
    obj.setdefault("changes", [])
    obj["format"] = "gpt-tui/2"
    return obj


# Each readable older version and the function that lifts it one version up.
UPGRADES = {"gpt-tui/1": _upgrade_1}


def upgrade(obj: dict[str, Any]) -> dict[str, Any]:
    """A payload of any readable version in today's format (CheckpointError for an unknown one)."""
    seen = 0
    while obj.get("format") != FORMAT:
        step = UPGRADES.get(str(obj.get("format")))
        if step is None or seen > len(UPGRADES):
            raise CheckpointError(f"format {obj.get('format')!r} is not a gpt-tui checkpoint format this version reads",
                                  "give a checkpoint written by gpt-tui (or import GPT-2 weights with gpt-tui import-gpt2)")
        obj = step(obj)
        seen += 1
    return obj


@dataclass
class Checkpoint:
    """Everything needed to resume a run exactly (or, with ``optimizer`` None, to load its weights)."""

    model: dict[str, torch.Tensor]
    """The model's state dict (``kind`` "lora": the adapters only)."""
    model_config: dict[str, Any]
    """:class:`engine.model.ModelConfig` as a dict."""
    tokenizer: dict[str, Any]
    """The tokenizer's spec (:func:`engine.tokenizer.tokenizer_from_spec` rebuilds it)."""
    train_config: dict[str, Any]
    """:class:`engine.config.TrainConfig` as a dict: the run's settings."""
    kind: str = "full"
    """``full`` (every weight) or ``lora`` (adapters; the base weights are named in ``lora``)."""
    step: int = 0
    epoch: int = 0
    tokens_seen: int = 0
    best_val: float | None = None
    optimizer: dict[str, Any] | None = None
    """The optimizer's state dict (None for weights-only checkpoints: imports and exports)."""
    scaler: dict[str, Any] | None = None
    """fp16's gradient scaler."""
    rng: dict[str, Any] | None = None
    """Every random stream (:func:`.io.rng_state`)."""
    world_size: int = 1
    """Processes that trained it (the RNG streams are restored only on as many)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """The task's own: the instruction template, prompt masking, the split sizes."""
    lora: dict[str, Any] | None = None
    """LoRA rank, alpha, layers and the path and sha256 of the base weights."""
    data: dict[str, Any] | None = None
    """Where the data stream stands: seed, epoch, step_in_epoch, windows_done, train_windows, tokens."""
    guard: dict[str, Any] = field(default_factory=dict)
    """The divergence guard: recent_losses, bad_steps."""
    last_eval: list[float] | None = None
    """(train loss, val loss) of the last evaluation."""
    last_eval_step: int | None = None
    changes: list[dict[str, Any]] = field(default_factory=list)
    """Live changes so far, in order: {step, setting, old, new, source}."""
    path: str = field(default="", compare=False)
    """Where it was loaded from (not stored)."""
    meta: dict[str, Any] = field(default_factory=dict, compare=False)
    """Its meta.json as read (not stored)."""
    skipped: list[str] = field(default_factory=list, compare=False)
    """Damaged newer checkpoints passed over to find this one (not stored)."""

    _NOT_STORED = ("path", "meta", "skipped")

    def to_payload(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in self._NOT_STORED}
        d["format"] = FORMAT
        return d

    @classmethod
    def from_payload(cls, obj: dict[str, Any], path: str = "", meta: dict[str, Any] | None = None) -> Checkpoint:
        obj = upgrade(obj)
        names = {f.name for f in dataclasses.fields(cls)} - set(cls._NOT_STORED)
        missing = [k for k in ("model", "model_config", "tokenizer", "train_config") if k not in obj]
        if missing:
            raise CheckpointError(f"{path or 'the checkpoint'} lacks {', '.join(missing)}", "use another checkpoint")
        return cls(**{k: v for k, v in obj.items() if k in names}, path=path, meta=meta or {})

    @property
    def run_dir(self) -> str:
        """The run directory the checkpoint file is in (``RUN/checkpoints/step-N.pt``)."""
        return os.path.dirname(os.path.dirname(os.path.abspath(self.path)))


@dataclass
class CheckpointMeta:
    """The meta.json beside a checkpoint: what a UI shows without loading it."""

    step: int
    kind: str = "full"
    reason: str = "periodic"
    """periodic, requested, stop, final, import, export..."""
    epoch: int = 0
    total_steps: int | None = None
    tokens_seen: int = 0
    train_loss: float | None = None
    """Losses measured at this very step (None when the last eval is older)."""
    val_loss: float | None = None
    best_val: float | None = None
    last_loss: float | None = None
    n_params: int | None = None
    model: dict[str, Any] | None = None
    tokenizer: dict[str, Any] | None = None
    """type, vocab_size, fingerprint."""

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["format"] = FORMAT
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CheckpointMeta:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names and k != "step"}, step=int(d.get("step", 0)))


def read_checkpoint_meta(path: str) -> CheckpointMeta | None:
    """The meta of a checkpoint file or of a run's newest checkpoint (None when there is none)."""
    try:
        pt = io.resolve_checkpoint(path)
    except CheckpointError:
        return None
    d = io.read_meta(pt)
    return CheckpointMeta.from_dict(d) if d is not None else None


def load_checkpoint(path: str, map_location: str | torch.device = "cpu", verify: bool = True) -> Checkpoint:
    """A checkpoint file, or a run directory's newest usable checkpoint, upgraded to today's format."""
    ckpt, skipped = io.load_raw(path, lambda obj, p, meta: Checkpoint.from_payload(obj, p, meta), map_location, verify)
    ckpt.skipped = skipped
    return ckpt


def save_checkpoint(path: str, ckpt: Checkpoint, meta: CheckpointMeta) -> str:
    """Write ``ckpt`` and its meta to ``path`` (see :func:`.io.write_checkpoint`); returns the path."""
    return io.write_checkpoint(path, ckpt.to_payload(), meta.to_dict())

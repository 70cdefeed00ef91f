"""The controller contract: what a dashboard, ``attach`` or a shell command may ask of a run.

Three things implement :class:`RunController`: the local :class:`engine.trainer.Trainer`
(commands are queued and carried out at the next step boundary), the remote controller of a
run in another process (through its control channel), and the read-only viewer of a run that
has ended (every command is refused with a :class:`engine.errors.GptTuiError`). The UI is typed
against this Protocol only; it never reaches into a trainer's model or tokenizer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from .sampling import SampleSettings


@runtime_checkable
class RunController(Protocol):
    """Thread-safe commands to one training run."""

    @property
    def paused(self) -> bool:
        """True while the run is paused."""
        ...

    @property
    def controls(self) -> bool:
        """False for a read-only viewer: the UI then offers no pause, checkpoint or eval."""
        ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def toggle_pause(self) -> bool:
        """Pause if running, resume if paused; True when now paused."""
        ...

    def request_checkpoint(self) -> None: ...

    def request_eval(self) -> None: ...

    def request_generate(self, prompt: str, settings: SampleSettings | None = None, raw: bool = False) -> int:
        """Queue a generation from the live weights; returns its request id (see GenerateEvent)."""
        ...

    def cancel_generation(self) -> None: ...

    def stop(self, save: bool = True) -> None:
        """Stop at the next step boundary (saving a checkpoint first when ``save``)."""
        ...

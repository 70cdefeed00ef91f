"""What a run learns from and shows: pretraining on text (here) or instruction finetuning
(:class:`engine.instruct.InstructTask`). The trainer's loop is the same for both.

A task sets up the data and tokenizer, says how many tokens a step sees, makes the periodic
samples, adds its own fields to checkpoints, and runs the end phase after the final checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from .data import TextData, build_char_tokenizer, load_tokens, resolve_sources, tokenize_to_cache
from .events import SampleEvent
from .sampling import SampleSettings
from .tokenizer import CharTokenizer, GPT2Tokenizer, Tokenizer, tokenizer_from_spec

if TYPE_CHECKING:
    from .checkpoint import Checkpoint
    from .config import TrainConfig
    from .trainer import Trainer


@dataclass
class TaskData:
    """What a task's setup gives the trainer."""

    tokenizer: Tokenizer
    data: Any
    """TextData or InstructionData: ``order``, ``train_batch``, ``eval_batches``, ``steps_per_epoch``."""
    context: int


class Task(Protocol):
    name: str
    template: str | None
    """The instruction template live generations go through (None: raw text)."""

    def setup_data(self, cfg: TrainConfig, resume: Checkpoint | None,
                   progress: Callable[[int, int], None] | None, log: Callable[[str, str], None]) -> TaskData: ...

    def tokens_per_step(self, trainer: Trainer) -> int: ...

    def samples(self, trainer: Trainer) -> None: ...

    def checkpoint_extra(self, trainer: Trainer) -> dict[str, Any]: ...

    def end_phase(self, trainer: Trainer) -> None:
        """After the final checkpoint: work that may be interrupted (test responses)."""
        ...

    def end_phase_seconds(self, trainer: Trainer) -> float:
        """About how long :meth:`end_phase` will take (for the ETA); 0 when there is none."""
        ...


def eval_text_size(data: Any, tokenizer: Tokenizer, n_batches: int, batch: int) -> tuple[int, int]:
    """(target tokens, their bytes of text) of the val batches every eval measures (bits per byte)."""
    sizes = tokenizer.token_bytes()
    n_tok = n_bytes = 0
    for _, y in data.eval_batches("val", n_batches, batch):
        ids = y[y >= 0].tolist()
        n_tok += len(ids)
        n_bytes += sum(sizes[i] for i in ids)
    return n_tok, n_bytes


class TextTask:
    """Pretraining: windows of a tokenized corpus, samples that continue ``--prompt``."""

    name = "pretrain"
    template: str | None = None

    def setup_data(self, cfg: TrainConfig, resume: Checkpoint | None,
                   progress: Callable[[int, int], None] | None, log: Callable[[str, str], None]) -> TaskData:
        files = resolve_sources(cfg.data)
        if resume is not None:
            tok = tokenizer_from_spec(resume.tokenizer)
        elif cfg.init:
            from .weights import init_tokenizer

            tok = init_tokenizer(cfg.init)
        elif cfg.effective_tokenizer() == "char":
            tok = build_char_tokenizer(files, cfg.text_field)
        else:
            tok = GPT2Tokenizer()
        tokens = load_tokens(tokenize_to_cache(files, tok, progress, text_field=cfg.text_field))
        context = cfg.effective_context()
        if cfg.init and cfg.context is None:  # the --init model's own context
            from .weights import init_context_length

            context = int(resume.model_config["context_length"]) if resume else init_context_length(cfg.init)
        data = TextData(tokens, context, cfg.stride or context, cfg.val_ratio, cfg.seed)
        return TaskData(tok, data, context)

    def tokens_per_step(self, trainer: Trainer) -> int:
        cfg = trainer.cfg
        return cfg.batch_size * cfg.grad_accum * trainer.context * trainer.world

    def samples(self, trainer: Trainer) -> None:
        """A continuation of ``--prompt`` (its first character instead where a char vocabulary lacks it)."""
        prompt = trainer.cfg.prompt
        if isinstance(trainer.tokenizer, CharTokenizer) and trainer.tokenizer.unknown(prompt):
            prompt = trainer.tokenizer.decode(trainer.data.train.tokens[:1].tolist())
        settings = SampleSettings(max_new_tokens=trainer.cfg.sample_tokens, temperature=0.8, top_k=50,
                                  seed=trainer.cfg.seed + trainer.step)
        text = trainer.generate_text(prompt, settings)
        trainer.emit(SampleEvent(step=trainer.step, epoch=trainer.epoch_of_step(trainer.step), text=text,
                                 prompt=prompt))

    def checkpoint_extra(self, trainer: Trainer) -> dict[str, Any]:
        return {}

    def end_phase(self, trainer: Trainer) -> None:
        pass

    def end_phase_seconds(self, trainer: Trainer) -> float:
        return 0.0

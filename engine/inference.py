"""Load a checkpoint for generation (no training state) and stream text from it."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from . import checkpoint as ck
from .commands import GenerateRequest
from .device import autocast_factory, resolve_device
from .errors import GptTuiError
from .events import GenerateEvent
from .model import GPT
from .prompts import format_prompt
from .sampling import SampleSettings, generate_stream
from .tokenizer import CharTokenizer, TextStream, Tokenizer, tokenizer_from_spec
from .weights import model_from_checkpoint


def encode_prompt(tokenizer: Tokenizer, prompt: str, context: int) -> tuple[list[int], str | None]:
    """The prompt's ids, cut to the last ``context - 1`` when longer, and a note when cut.

    Raises GptTuiError for an empty prompt or (char tokenizers) characters outside the vocabulary.
    """
    if not prompt:
        raise GptTuiError("the prompt is empty", "type some text to start from")
    if isinstance(tokenizer, CharTokenizer):
        bad = tokenizer.unknown(prompt)
        if bad:
            raise GptTuiError(
                f"prompt has character(s) outside the model's char vocabulary: {' '.join(repr(c) for c in bad[:10])}",
                "use only characters from the training corpus",
            )
    ids = tokenizer.encode(prompt)
    if len(ids) >= context:
        return ids[-(context - 1):], f"prompt has {len(ids)} tokens, the context is {context}: using its last {context - 1} tokens"
    return ids, None


def stream_text(model: GPT, tokenizer: Tokenizer, ids: list[int], settings: SampleSettings,
                should_stop: Callable[[], bool] | None = None, autocast: Callable | None = None,
                stats: dict | None = None) -> Iterator[str]:
    """Yield the text of the tokens generated after ``ids`` as it becomes whole (see TextStream)."""
    device = next(model.parameters()).device
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    eot = tokenizer.eot_id
    stream = TextStream(tokenizer)
    t0 = time.perf_counter()
    for nxt in generate_stream(model, idx, settings, eot, should_stop, autocast):
        t = int(nxt[0])
        if eot is not None and t == eot and settings.stop_at_eot:
            break
        piece = stream.push(t)
        if stats is not None:
            stats["tokens"] = len(stream.ids)
            stats["tokens_per_sec"] = len(stream.ids) / max(1e-9, time.perf_counter() - t0)
        if piece:
            yield piece
    rest = stream.flush()
    if rest:
        yield rest


def generate_text(model: GPT, tokenizer: Tokenizer, prompt: str, settings: SampleSettings, autocast: Callable | None,
                  should_stop: Callable[[], bool] | None = None, on_token: Callable[[str], None] | None = None,
                  note: Callable[[str], None] | None = None) -> str:
    """The text generated after ``prompt`` (its tail when it is longer than the context: ``note`` says so),
    each whole piece passed to ``on_token`` as it comes."""
    ids, cut = encode_prompt(tokenizer, prompt, model.cfg.context_length)
    if cut and note:
        note(cut)
    pieces = []
    for piece in stream_text(model, tokenizer, ids, settings, should_stop, autocast):
        pieces.append(piece)
        if on_token is not None:
            on_token(piece)
    return "".join(pieces)


def serve_generation(req: GenerateRequest, template: str | None, generate_text: Callable[..., str],
                     emit: Callable[[Any], None]) -> None:
    """Carry out a live generation request: its text as GenerateEvents (a note first when the prompt is
    cut, the last one ``done`` with the speed, or with ``error`` when the prompt cannot be taken)."""
    t0, n = time.perf_counter(), 0
    prompt = req.prompt if req.raw else format_prompt(template, req.prompt)

    def on_token(piece: str) -> None:
        nonlocal n
        n += 1
        emit(GenerateEvent(request_id=req.request_id, text=piece, prompt=req.prompt))

    def note(text: str) -> None:
        emit(GenerateEvent(request_id=req.request_id, text="", prompt=req.prompt, note=text))

    try:
        generate_text(prompt, req.settings, on_token, note, cancellable=True)
    except GptTuiError as e:
        emit(GenerateEvent(request_id=req.request_id, text="", prompt=req.prompt, done=True, error=str(e)))
        return
    tps = n / max(1e-9, time.perf_counter() - t0)
    emit(GenerateEvent(request_id=req.request_id, text="", prompt=req.prompt, done=True, tokens_per_sec=tps))


@dataclass
class LoadedModel:
    """A model ready to sample from."""

    model: GPT
    tokenizer: Tokenizer
    device: torch.device
    path: str
    meta: dict = field(default_factory=dict)
    template: str | None = None
    """The instruction template (``alpaca`` for instruction-tuned checkpoints)."""
    step: int = 0

    def format_prompt(self, prompt: str) -> str:
        return format_prompt(self.template, prompt)

    def check_prompt(self, prompt: str) -> list[int]:
        return encode_prompt(self.tokenizer, prompt, self.model.cfg.context_length)[0]

    def truncation_note(self, prompt: str) -> str | None:
        return encode_prompt(self.tokenizer, prompt, self.model.cfg.context_length)[1]

    def stream(self, prompt: str, settings: SampleSettings, should_stop: Callable[[], bool] | None = None,
               stats: dict | None = None) -> Iterator[str]:
        """Yield text pieces as tokens are generated (multi-byte characters kept whole)."""
        ids = self.check_prompt(prompt)
        return stream_text(self.model, self.tokenizer, ids, settings, should_stop, self.autocast, stats)

    def generate(self, prompt: str, settings: SampleSettings) -> str:
        return "".join(self.stream(prompt, settings))

    @property
    def autocast(self) -> Callable:
        return autocast_factory(self.device, "fp32")


def load_for_inference(source: str, device: str = "auto") -> LoadedModel:
    """A run's newest usable checkpoint (or a checkpoint file) ready to sample from."""
    dev = resolve_device(device)
    ckpt = ck.load_checkpoint(source)
    model = model_from_checkpoint(ckpt).to(dev).eval()
    return LoadedModel(model=model, tokenizer=tokenizer_from_spec(ckpt.tokenizer), device=dev, path=ckpt.path,
                       meta=ckpt.meta, template=ckpt.extra.get("template"), step=ckpt.step)

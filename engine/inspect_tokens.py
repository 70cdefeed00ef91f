"""Look inside generation: token splits, next-token candidates, and a run's sample timeline.

Everything here is plain torch: the sampling panel's token and timeline views
(``gpt-tui sample``) draw what these functions return.

- :func:`split_tokens` shows how a text splits into token ids and pieces. GPT-2 byte
  tokens that hold only part of a character (most Chinese characters take 2-3 of them)
  show as ``<0x..>`` bytes and name the character they belong to.
- :func:`top_candidates` gives the most likely next tokens with their probability before
  and after temperature, top-k and top-p (:func:`engine.sampling.filter_logits`).
- :func:`recorded_samples` and :func:`checkpoint_samples` build the sample timeline of a
  run: the per-epoch samples training wrote to ``metrics.jsonl`` and one prompt sampled
  from each saved checkpoint, each with its step and validation loss.
- :func:`masked_targets` lists which target positions of a training batch are masked
  (-100) and so do not count in the loss; :func:`instruction_batch` does it for an
  instruction-finetuning batch made by :mod:`engine.instruct`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import torch

from . import checkpoint as ck
from .errors import GptTuiError
from .events import read_metrics
from .model import GPT
from .sampling import SampleSettings, eval_mode, filter_logits
from .tokenizer import Tokenizer

IGNORE_INDEX = -100


# ----------------------------------------------------------------------------- tokens
@dataclass
class TokenPiece:
    """One token of a text."""

    index: int
    id: int
    piece: str
    """The token's text; bytes of a partial UTF-8 character as ``<0x..>``."""
    part_of: str = ""
    """The character(s) this token holds only part of ('' when it holds whole characters)."""


def show_piece(piece: str) -> str:
    """A token's text made visible: quoted, with newlines, tabs and control characters escaped."""
    return repr(piece)


def split_tokens(tokenizer: Tokenizer, text: str) -> list[TokenPiece]:
    """How ``text`` splits into tokens (ids, pieces, and characters split across tokens)."""
    ids = tokenizer.encode(text)
    spans: list[tuple[int, int]] = []
    pos = 0
    for t in ids:
        n = len(tokenizer.decode_bytes([t]))
        spans.append((pos, pos + n))
        pos += n
    # byte span of every character of the decoded text
    chars: list[tuple[int, int, str]] = []
    pos = 0
    for c in tokenizer.decode(ids):
        n = len(c.encode("utf-8"))
        chars.append((pos, pos + n, c))
        pos += n
    out = []
    for i, (t, (a, b)) in enumerate(zip(ids, spans, strict=True)):
        split = "".join(c for s, e, c in chars if s < b and e > a and (s < a or e > b))
        out.append(TokenPiece(index=i, id=t, piece=tokenizer.piece(t), part_of=split))
    return out


@dataclass
class Candidate:
    """A possible next token."""

    id: int
    piece: str
    prob: float
    """Probability after temperature, top-k and top-p (0: cut by them)."""
    raw_prob: float
    """Probability of the model's plain softmax (temperature 1, nothing cut)."""


def top_candidates(
    model: GPT,
    ids: Sequence[int],
    tokenizer: Tokenizer,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    n: int = 10,
) -> list[Candidate]:
    """The ``n`` most likely tokens to follow ``ids``, most likely first.

    ``ids`` longer than the context are cut from the left, as generation does.
    """
    if not ids:
        raise GptTuiError("there is no text to continue", "type a prompt first")
    device = next(model.parameters()).device
    idx = torch.tensor([list(ids)[-model.cfg.context_length:]], dtype=torch.long, device=device)
    with eval_mode(model):
        logits = model(idx)[0, -1].float()
    raw = torch.softmax(logits, dim=-1)
    probs = filter_logits(logits[None], temperature, top_k, top_p)[0]
    # temperature keeps the order and top-k/top-p keep a head of it, so the raw order is the order
    order = torch.topk(raw, min(n, raw.numel())).indices.tolist()
    return [Candidate(id=i, piece=tokenizer.piece(i), prob=float(probs[i]), raw_prob=float(raw[i])) for i in order]


@dataclass
class MaskedPosition:
    """One position of a training row: the input token, and the target or a mask."""

    index: int
    input_id: int
    input_piece: str
    target_id: int
    """The token the loss asks for here, or -100 when the position is masked."""
    target_piece: str


def masked_targets(inputs: torch.Tensor, targets: torch.Tensor, tokenizer: Tokenizer) -> list[MaskedPosition]:
    """Positions of one row (1-D ``inputs`` and ``targets``): which targets are masked (-100)."""
    out = []
    for i, (x, y) in enumerate(zip(inputs.tolist(), targets.tolist(), strict=True)):
        piece = "" if y == IGNORE_INDEX else tokenizer.piece(y)
        out.append(MaskedPosition(index=i, input_id=x, input_piece=tokenizer.piece(x), target_id=y, target_piece=piece))
    return out


def instruction_batch(
    tokenizer: Tokenizer, records: Sequence[dict[str, str]], mask_prompt: bool = True, max_length: int | None = None
) -> list[list[MaskedPosition]]:
    """The positions of an instruction-finetuning batch of Alpaca records, row by row.

    Built by the finetuning code itself (:func:`engine.instruct.collate`): end-of-text
    padding after the first end-of-text is masked, and with ``mask_prompt`` the prompt too.
    """
    if tokenizer.eot_id is None:
        raise GptTuiError("instruction batches need a tokenizer with an end-of-text token",
                          "use a checkpoint with the GPT-2 tokenizer")
    from .instruct import collate, encode_records

    items = encode_records(tokenizer, list(records))
    inputs, targets = collate(items, tokenizer.eot_id, max_length, mask_prompt)
    return [masked_targets(x, y, tokenizer) for x, y in zip(inputs, targets, strict=True)]


# --------------------------------------------------------------------------- timeline
@dataclass
class TimelineEntry:
    """A sample of a run at one step."""

    step: int
    kind: str
    """``checkpoint`` (sampled now from a saved checkpoint) or ``recorded`` (written by training)."""
    prompt: str
    text: str
    val_loss: float | None = None
    epoch: int | None = None
    path: str | None = None
    error: str | None = None
    """Why no text could be made (a checkpoint removed or damaged meanwhile)."""


def run_dir_of(source: str) -> str | None:
    """The run directory of a run directory or of a checkpoint inside ``RUN/checkpoints/``."""
    path = os.path.abspath(source)
    if os.path.isdir(path):
        return path
    parent = os.path.dirname(path)
    if os.path.basename(parent) == "checkpoints":
        return os.path.dirname(parent)
    return None


def val_loss_at(evals: Sequence[dict], step: int) -> float | None:
    """Validation loss at ``step``: the last evaluation at or before it (None if none)."""
    best: tuple[int, float] | None = None
    for e in evals:
        s, v = e.get("step"), e.get("val_loss")
        if isinstance(s, int) and isinstance(v, (int, float)) and s <= step and (best is None or s >= best[0]):
            best = (s, float(v))
    return best[1] if best else None


def recorded_samples(run_dir: str) -> list[TimelineEntry]:
    """The samples training recorded in ``metrics.jsonl``, oldest first (safe while it is written)."""
    records = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    evals = [r for r in records if r.get("type") == "eval"]
    out = []
    for r in records:
        if r.get("type") != "sample" or not isinstance(r.get("step"), int):
            continue
        out.append(TimelineEntry(step=r["step"], kind="recorded", prompt=str(r.get("prompt", "")),
                                 text=str(r.get("text", "")), val_loss=val_loss_at(evals, r["step"]),
                                 epoch=r.get("epoch")))
    out.sort(key=lambda e: e.step)
    return out


def checkpoint_samples(
    run_dir: str,
    prompt: str,
    settings: SampleSettings,
    device: str = "cpu",
    skip: Callable[[str], bool] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Iterator[TimelineEntry]:
    """Sample ``prompt`` from each complete checkpoint of a run, oldest first.

    Every checkpoint uses the same settings and seed (seed 0 when none is set), so the
    differences come from the weights. Checkpoints for which ``skip(path)`` is true are
    left out (already sampled); one that cannot be loaded gives an entry with ``error``.
    A prompt the model cannot take (empty, characters outside a char vocabulary) raises
    :class:`GptTuiError`.
    """
    from .inference import load_for_inference  # loads the model code only when sampling

    if settings.seed is None:
        settings = replace(settings, seed=0)
    evals = [r for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if r.get("type") == "eval"]
    for step, path, meta in ck.list_checkpoints(run_dir):
        if skip is not None and skip(path):
            continue
        if should_stop is not None and should_stop():
            return
        val = meta.get("val_loss")
        val = float(val) if isinstance(val, (int, float)) else val_loss_at(evals, step)
        entry = TimelineEntry(step=step, kind="checkpoint", prompt=prompt, text="", val_loss=val,
                              epoch=meta.get("epoch"), path=path)
        try:
            lm = load_for_inference(path, device)
        except GptTuiError as e:  # removed by pruning meanwhile, or damaged
            entry.error = str(e)
            yield entry
            continue
        entry.text = lm.generate(lm.format_prompt(prompt), settings)  # a bad prompt raises: bad for all
        yield entry

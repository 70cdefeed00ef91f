"""Text generation: greedy, temperature, top-k, top-p, end-of-text stop, KV cache.

``generate_stream`` yields token ids one at a time so a UI can stream them; ``generate``
returns the whole batch. ``use_cache=False`` recomputes the full context every token,
as the book's ``generate_text_simple`` does (for comparison and benchmarks).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields

import torch

from .errors import GptTuiError
from .model import GPT, KVCache


@dataclass
class SampleSettings:
    """How to pick the next token."""

    max_new_tokens: int = 100
    """How many tokens to generate at most."""
    temperature: float = 0.8
    """Softmax temperature; 0 means greedy (argmax)."""
    top_k: int | None = 50
    """Keep only the k most likely tokens (None or 0: all)."""
    top_p: float | None = None
    """Nucleus sampling: keep the smallest set with this probability mass (None: off)."""
    seed: int | None = None
    """Seed for a private generator, so the same seed gives the same text."""
    stop_at_eot: bool = True
    """Stop when the end-of-text token is produced."""
    use_cache: bool = True
    """Use the KV cache (False recomputes the whole context each token)."""

    def validate(self) -> SampleSettings:
        """Check every setting (GptTuiError naming a bad one); returns self."""
        if self.temperature < 0:
            raise GptTuiError(f"temperature must not be negative, got {self.temperature:g}", "use 0 for greedy")
        if self.top_k is not None and self.top_k < 0:
            raise GptTuiError(f"top-k must not be negative, got {self.top_k}", "use 0 to keep all tokens")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise GptTuiError(f"top-p must be in (0, 1], got {self.top_p:g}", "use e.g. 0.9, or leave it off")
        if self.max_new_tokens <= 0:
            raise GptTuiError(f"max new tokens must be positive, got {self.max_new_tokens}", "give a value above 0")
        return self

    @classmethod
    def from_dict(cls, d: dict) -> SampleSettings:
        """Settings from a dict of field values (unknown names refused), checked."""
        names = {f.name for f in fields(cls)}
        unknown = [k for k in d if k not in names]
        if unknown:
            raise GptTuiError(f"unknown sample setting(s) {', '.join(unknown)}", f"use {', '.join(sorted(names))}")
        return cls(**d).validate()

    def to_dict(self) -> dict:
        return asdict(self)


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Apply temperature, top-k and top-p to logits (B, V); returns probabilities."""
    logits = logits.float()
    if temperature <= 0:
        probs = torch.zeros_like(logits)
        probs.scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
        return probs
    logits = logits / temperature
    if top_k and top_k > 0 and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        remove = cum - torch.softmax(sorted_logits, dim=-1) >= top_p  # keep the token that crosses p
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, sorted_idx, sorted_logits)
    return torch.softmax(logits, dim=-1)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Eval mode and no grad for the block; the previous training mode restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


TRANSPOSED_HEAD_ON_CPU = True
"""Apply a plain LM head on CPU as ``h @ W.T`` from a contiguous copy of ``W.T`` (see :func:`next_logits_fn`)."""
TRANSPOSED_HEAD_MIN_TOKENS = 32
"""Shortest generation for which the copy pays: it costs about 20-30 tokens' worth of saved head time."""


def next_logits_fn(model: GPT, n_tokens: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The LM head for a generation of ``n_tokens``: next-token logits (B, V) from hidden states (B, C).

    On CPU, one row against the (vocab x width) head matrix runs about 1.7x as fast with the
    matrix transposed and contiguous, and the head is a large part of a cached token (about
    half on ``small``, a third on ``gpt2``: benchmarks/bench_generate.py). So for a long enough
    generation a plain bias-free ``nn.Linear`` head is copied transposed once; other heads
    (LoRA wrappers), other devices and short generations use the module itself.
    """
    head = model.head
    if (not TRANSPOSED_HEAD_ON_CPU or n_tokens < TRANSPOSED_HEAD_MIN_TOKENS or type(head) is not torch.nn.Linear
            or head.bias is not None or head.weight.device.type != "cpu"):
        return head
    wt = head.weight.detach().t().contiguous()
    return lambda h: h @ wt


def _window_forward(
    model: GPT, idx: torch.Tensor, pad: torch.Tensor | None, keep_cache: bool
) -> tuple[torch.Tensor, KVCache | None]:
    """Hidden states of the last context window of ``idx``, and a cache to continue from.

    The window's rows keep their left padding (masked out, positions counted from each
    row's first real token). A cache is returned only when ``keep_cache`` and the window
    leaves room for more tokens.
    """
    ctx_len = model.cfg.context_length
    window = idx[:, -ctx_len:]
    wpad = None if pad is None else (pad - (idx.size(1) - window.size(1))).clamp(min=0)
    padded = wpad is not None and bool((wpad > 0).any())
    room = keep_cache and window.size(1) < ctx_len
    cache = KVCache(model.cfg, idx.size(0), ctx_len if room else window.size(1), wpad) if (padded or room) else None
    h = model.hidden(window, cache)
    return h, cache if room else None


def generate_stream(
    model: GPT,
    idx: torch.Tensor,
    settings: SampleSettings,
    eot_id: int | None = None,
    should_stop: Callable[[], bool] | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
    pad: torch.Tensor | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token ids (shape (B,)) one step at a time.

    ``idx`` is (B, T) of prompt ids; prompts longer than the context are cut from the left.
    ``pad`` (B,) counts the left-padding tokens of each row when prompts of different
    lengths share a batch (see :func:`generate_batch`).

    With ``settings.use_cache`` the prompt is run once into a KV cache and each new token
    costs one position. Once the text outgrows the context, every step recomputes the last
    ``context_length`` tokens, exactly as the uncached loop does: with absolute position
    embeddings a sliding window shifts every position, so no cached key would stay valid.
    Cached and uncached decoding therefore pick the same tokens.

    The caller's global RNG is not touched: sampling uses its own generator.
    """
    device = idx.device
    gen = torch.Generator(device=device)
    if settings.seed is not None:
        gen.manual_seed(settings.seed)
    else:
        gen.seed()
    amp = autocast or contextlib.nullcontext
    keep_cache = settings.use_cache and model.pos_emb is not None
    B = idx.size(0)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    cache: KVCache | None = None
    with eval_mode(model):
        head = next_logits_fn(model, settings.max_new_tokens)
        for _ in range(settings.max_new_tokens):
            if should_stop is not None and should_stop():
                return
            with amp():
                if cache is not None and cache.pos < cache.max_len:
                    h = model.hidden(idx[:, -1:], cache)
                else:
                    h, cache = _window_forward(model, idx, pad, keep_cache)
                logits = head(h[:, -1, :])
            probs = filter_logits(logits, settings.temperature, settings.top_k, settings.top_p)
            if settings.temperature <= 0:
                nxt = probs.argmax(-1)
            else:
                nxt = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
            if eot_id is not None and settings.stop_at_eot:
                nxt = torch.where(done, torch.full_like(nxt, eot_id), nxt)
            idx = torch.cat([idx, nxt[:, None]], dim=1)
            yield nxt
            if eot_id is not None and settings.stop_at_eot:
                done |= nxt == eot_id
                if bool(done.all()):
                    return


def generate(
    model: GPT,
    idx: torch.Tensor,
    settings: SampleSettings,
    eot_id: int | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> torch.Tensor:
    """Generate for a batch of prompts; returns (B, T + new) ids (finished rows padded with EOT)."""
    out = [idx]
    for nxt in generate_stream(model, idx, settings, eot_id, autocast=autocast):
        out.append(nxt[:, None])
    return torch.cat(out, dim=1)


def generate_batch(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    settings: SampleSettings,
    eot_id: int | None = None,
    should_stop: Callable[[], bool] | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> list[list[int]]:
    """New token ids for several prompts (of any lengths) generated together in one batch.

    Prompts are left-padded to the longest; padded keys are masked out of attention and
    each row's positions start at its first real token, so with greedy decoding every row
    gets the tokens it would get alone. Each row stops at its own end-of-text (not
    included). Sampled rows share one generator: a seed fixes the whole batch's output.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise GptTuiError("a prompt of the batch is empty", "give every prompt some text")
    device = next(model.parameters()).device
    longest = max(len(p) for p in prompts)
    fill = eot_id if eot_id is not None else 0
    idx = torch.full((len(prompts), longest), fill, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        idx[i, longest - len(p):] = torch.tensor(list(p), dtype=torch.long, device=device)
    pad = torch.tensor([longest - len(p) for p in prompts], dtype=torch.long, device=device)
    out: list[list[int]] = [[] for _ in prompts]
    finished = [False] * len(prompts)
    for nxt in generate_stream(model, idx, settings, eot_id, should_stop, autocast, pad=pad):
        for i, t in enumerate(nxt.tolist()):
            if finished[i]:
                continue
            if eot_id is not None and settings.stop_at_eot and t == eot_id:
                finished[i] = True
            else:
                out[i].append(t)
    return out


def generate_text_simple(model: GPT, idx: torch.Tensor, max_new_tokens: int, context_size: int) -> torch.Tensor:
    """The book's greedy loop without a cache (reference for tests and benchmarks)."""
    with eval_mode(model):
        for _ in range(max_new_tokens):
            logits = model(idx[:, -context_size:])[:, -1, :]
            idx = torch.cat([idx, logits.argmax(-1, keepdim=True)], dim=1)
    return idx

"""Tokenizers: GPT-2 BPE (tiktoken, offline) and character level.

The GPT-2 vocabulary is built from OpenAI's ``encoder.json``/``vocab.bpe``, shipped with
gpt-tui in ``engine/assets/`` (checked by sha256; origin and licence in the notice file
there), so it works on a fresh install with no network. A char tokenizer is built from the corpus and
saved with the run so that sampling later decodes identically.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterable
from functools import lru_cache

from .errors import GptTuiError

EOT_TEXT = "<|endoftext|>"
_VOCAB_BPE_SHA = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
_ENCODER_JSON_SHA = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
"""Package data: GPT-2's ``encoder.json`` and ``vocab.bpe`` (OpenAI's, see NOTICE-gpt2-vocab.md)."""


def gpt2_vocab_files() -> tuple[str, str]:
    """Paths of the packaged ``vocab.bpe`` and ``encoder.json`` (GPT-2's merges and vocabulary)."""
    vocab_bpe, encoder_json = os.path.join(ASSETS, "vocab.bpe"), os.path.join(ASSETS, "encoder.json")
    for f in (vocab_bpe, encoder_json):
        if not os.path.isfile(f):
            raise GptTuiError(f"the GPT-2 vocabulary file {f} is missing from the installation",
                              "reinstall gpt-tui (pip install --force-reinstall gpt-tui)")
    return vocab_bpe, encoder_json


_RANKS_MAGIC = b"gpt-tui-ranks-1\n"


def _ranks_path() -> str:
    from .corpus import cache_dir

    return os.path.join(cache_dir(), f"gpt2-ranks-{_VOCAB_BPE_SHA[:12]}-{_ENCODER_JSON_SHA[:12]}.bin")


def _cached_ranks() -> dict[bytes, int] | None:
    """The merge ranks from the cache's compact copy (parsing the packaged files takes over a second)."""
    try:
        with open(_ranks_path(), "rb") as f:
            raw = f.read()
    except OSError:
        return None
    head = len(_RANKS_MAGIC)
    if raw[:head] != _RANKS_MAGIC or len(raw) < head + 40:
        return None
    n = int.from_bytes(raw[head : head + 4], "little")
    digest = raw[head + 4 : head + 36]
    body = raw[head + 36 :]
    if hashlib.sha256(body).digest() != digest or len(body) < 2 * n:
        return None
    lengths = memoryview(body)[: 2 * n].cast("H")
    blob = body[2 * n :]
    ranks: dict[bytes, int] = {}
    pos = 0
    for i, ln in enumerate(lengths):
        ranks[blob[pos : pos + ln]] = i
        pos += ln
    return ranks if pos == len(blob) else None


def _save_ranks(ranks: dict[bytes, int]) -> None:
    order = sorted(ranks, key=ranks.__getitem__)
    if [ranks[b] for b in order] != list(range(len(order))) or any(len(b) > 65535 for b in order):
        return
    import array

    lengths = array.array("H", (len(b) for b in order))
    if sys.byteorder != "little":  # pragma: no cover
        lengths.byteswap()
    body = lengths.tobytes() + b"".join(order)
    data = _RANKS_MAGIC + len(order).to_bytes(4, "little") + hashlib.sha256(body).digest() + body
    try:
        path = _ranks_path()
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError:  # a read-only cache only costs the faster start
        pass


@lru_cache(maxsize=1)
def gpt2_encoding():
    """The tiktoken ``gpt2`` encoding, built offline from packaged files."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    ranks = _cached_ranks()
    if ranks is None:
        vocab_bpe, encoder_json = gpt2_vocab_files()
        ranks = data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=vocab_bpe,
            encoder_json_file=encoder_json,
            vocab_bpe_hash=_VOCAB_BPE_SHA,
            encoder_json_hash=_ENCODER_JSON_SHA,
        )
        _save_ranks(ranks)
    return tiktoken.Encoding(
        name="gpt2",
        explicit_n_vocab=50257,
        pat_str=r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
        mergeable_ranks=ranks,
        special_tokens={EOT_TEXT: 50256},
    )


class Tokenizer:
    """Common interface of the tokenizers."""

    name: str = ""
    vocab_size: int = 0
    eot_id: int | None = None

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self.decode(ids).encode("utf-8")

    def piece(self, token_id: int) -> str:
        """Text of one token (byte tokens of a partial character shown as <0x..>)."""
        return self.decode([token_id])

    def spec(self) -> dict:
        """A JSON-able description that :func:`tokenizer_from_spec` rebuilds from."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.spec(), sort_keys=True).encode()).hexdigest()[:16]

    def token_bytes(self) -> list[int]:
        """UTF-8 bytes of each id's text (for bits per byte); 0 for special tokens."""
        return [len(self.decode_bytes([i])) for i in range(self.vocab_size)]


class GPT2Tokenizer(Tokenizer):
    name = "gpt2"
    vocab_size = 50257
    eot_id = 50256

    @property
    def enc(self):
        """The tiktoken encoding, built on first use (so a tokenizer object alone costs nothing)."""
        return gpt2_encoding()

    def encode(self, text: str) -> list[int]:
        return self.enc.encode(text, allowed_special={EOT_TEXT})

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        return self.enc.encode_ordinary_batch(list(texts), num_threads=2)

    def decode(self, ids: Iterable[int]) -> str:
        return self.enc.decode(list(ids), errors="replace")

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self.enc.decode_bytes(list(ids))

    def token_bytes(self) -> list[int]:
        enc = self.enc
        return [0 if i == self.eot_id else len(enc.decode_single_token_bytes(i)) for i in range(self.vocab_size)]

    def piece(self, token_id: int) -> str:
        b = self.enc.decode_single_token_bytes(token_id)
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:
            return "".join(f"<0x{c:02X}>" for c in b)

    def spec(self) -> dict:
        return {"type": "gpt2"}


class CharTokenizer(Tokenizer):
    """One id per distinct character of the corpus (sorted), plus nothing else."""

    name = "char"

    def __init__(self, chars: Iterable[str]) -> None:
        self.chars = sorted(set(chars))
        if not self.chars:
            raise GptTuiError("cannot build a char tokenizer from empty text", "give a non-empty corpus")
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.vocab_size = len(self.chars)

    def unknown(self, text: str) -> list[str]:
        """Characters of ``text`` outside the vocabulary, in order of first appearance."""
        seen: dict[str, None] = {}
        for c in text:
            if c not in self.stoi:
                seen[c] = None
        return list(seen)

    def encode(self, text: str) -> list[int]:
        bad = self.unknown(text)
        if bad:
            shown = " ".join(repr(c) for c in bad[:10])
            raise GptTuiError(
                f"text has {len(bad)} character(s) outside the char vocabulary: {shown}",
                "use only characters that occur in the training corpus",
            )
        return [self.stoi[c] for c in text]

    def decode(self, ids: Iterable[int]) -> str:
        n = self.vocab_size
        return "".join(self.chars[i] if 0 <= i < n else "\ufffd" for i in ids)

    def spec(self) -> dict:
        return {"type": "char", "chars": "".join(self.chars)}


class TextStream:
    """Text of a growing list of token ids, handed out in pieces as it becomes whole.

    A multi-byte character split over several tokens is held back until its last byte
    arrives, so a UI never shows a replacement character mid-stream.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token_id: int) -> str:
        """Add one id; returns the new text that is complete now ("" when a character is unfinished)."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        piece, self.emitted = text[len(self.emitted):], text
        return piece

    def flush(self) -> str:
        """What is left at the end (an unfinished character as a replacement character)."""
        text = self.text
        piece, self.emitted = text[len(self.emitted):], text
        return piece

    @property
    def text(self) -> str:
        return self.tokenizer.decode(self.ids)


def tokenizer_from_spec(spec: dict) -> Tokenizer:
    kind = spec.get("type")
    if kind == "gpt2":
        return GPT2Tokenizer()
    if kind == "char":
        return CharTokenizer(spec["chars"])
    raise GptTuiError(f"unknown tokenizer {kind!r}", "use --tokenizer gpt2 or --tokenizer char")


TOKENIZERS = ("gpt2", "char")


def check_tokenizer_name(name: str) -> None:
    if name not in TOKENIZERS:
        raise GptTuiError(f"unknown tokenizer {name!r}", f"choose one of {', '.join(TOKENIZERS)}")

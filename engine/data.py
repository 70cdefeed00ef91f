"""Text data: files, folders or named corpora, tokenized once into a memory-mapped cache.

A corpus is read in chunks, tokenized and appended to a ``.bin`` token file (uint16 when
the vocabulary fits, else uint32) under the cache directory, keyed by the files' paths,
sizes and modification times and by the tokenizer. Training reads context-length windows
straight from the memory map, so a 1 GB corpus never sits in RAM as Python lists.

Windows follow LLMs-from-scratch: input ``ids[i:i+ctx]``, target ``ids[i+1:i+ctx+1]``
for ``i`` in ``range(0, n - ctx, stride)``. An epoch is one pass over the training
windows in an order shuffled from ``(seed, epoch)``, so any position in any epoch can be
rebuilt exactly on resume.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .corpus import DEFAULT_CORPUS, NAMED, cache_dir, fetch
from .errors import DataError
from .tokenizer import CharTokenizer, GPT2Tokenizer, Tokenizer

TEXT_SUFFIXES = {".txt", ".md", ".text", ".rst", ".tex", ".csv", ".json", ".jsonl", ".py", ".html", ".xml"}
CHUNK_BYTES = 4 << 20

Progress = Callable[[int, int], None]  # (bytes done, bytes total)


def resolve_sources(data: list[str]) -> list[str]:
    """Expand ``--data`` entries into a sorted list of readable, non-empty text files."""
    if not data:
        data = [DEFAULT_CORPUS]
    files: list[str] = []
    for entry in data:
        if entry in NAMED and not os.path.exists(entry):
            files.append(fetch(entry))
            continue
        if not os.path.exists(entry):
            raise DataError(f"data path {entry} does not exist", f"check the path, or use a named corpus ({', '.join(NAMED)})")
        if os.path.isdir(entry):
            found = []
            for root, dirs, names in os.walk(entry):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for n in sorted(names):
                    if not n.startswith(".") and os.path.splitext(n)[1].lower() in TEXT_SUFFIXES:
                        found.append(os.path.join(root, n))
            if not found:
                raise DataError(f"folder {entry} holds no text files", f"put .txt files in it (suffixes: {' '.join(sorted(TEXT_SUFFIXES))})")
            files.extend(found)
        else:
            files.append(entry)
    for f in files:
        _check_text_file(f)
    return files


def _check_text_file(path: str) -> None:
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            head = fh.read(CHUNK_BYTES)
    except OSError as e:
        raise DataError(f"cannot read data file {path} ({e.strerror})", "check the file's permissions") from None
    if size == 0 or not head.strip():
        raise DataError(f"data file {path} is empty", "give a file with text in it")
    if b"\x00" in head:
        raise DataError(f"data file {path} looks binary (it contains NUL bytes)", "give a UTF-8 text file")
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 4:  # not just a character cut at the chunk's end
            raise DataError(
                f"data file {path} is not UTF-8 text (bad byte at offset {e.start})",
                "convert it, e.g. iconv -f latin1 -t utf-8",
            ) from None


def _iter_text(path: str) -> Iterator[tuple[str, int]]:
    """Yield (text chunk, bytes read) of a UTF-8 file, cut at line boundaries."""
    with open(path, "rb") as f:
        rest = b""
        offset = 0
        while True:
            block = f.read(CHUNK_BYTES)
            if not block:
                break
            block = rest + block
            cut = block.rfind(b"\n")
            if cut < 0 or len(block) < CHUNK_BYTES // 2:
                cut = len(block) - 1
            piece, rest = block[: cut + 1], block[cut + 1 :]
            try:
                text = piece.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"data file {path} is not UTF-8 text (bad byte near offset {offset + e.start})",
                    "convert it, e.g. iconv -f latin1 -t utf-8",
                ) from None
            offset += len(piece)
            yield text, len(piece)
        if rest:
            try:
                yield rest.decode("utf-8"), len(rest)
            except UnicodeDecodeError:
                raise DataError(f"data file {path} is not UTF-8 text (it ends mid-character)", "convert it to UTF-8") from None


def build_char_tokenizer(files: list[str]) -> CharTokenizer:
    chars: set[str] = set()
    for f in files:
        for text, _ in _iter_text(f):
            chars.update(text)
    return CharTokenizer(chars)


def _cache_key(files: list[str], tok: Tokenizer) -> str:
    h = hashlib.sha256()
    for f in files:
        st = os.stat(f)
        h.update(f"{os.path.abspath(f)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    h.update(tok.fingerprint().encode())
    return h.hexdigest()[:24]


def tokenize_to_cache(files: list[str], tok: Tokenizer, progress: Progress | None = None) -> str:
    """Tokenize files (separated by end-of-text where the tokenizer has one) into a cached token file."""
    key = _cache_key(files, tok)
    d = os.path.join(cache_dir(), "tokens")
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, f"{key}.bin")
    meta_path = path + ".json"
    if os.path.exists(path) and os.path.exists(meta_path):
        return path
    dtype = np.uint16 if tok.vocab_size <= 65536 else np.uint32
    total = sum(os.path.getsize(f) for f in files)
    done = 0
    n = 0
    tmp = path + f".tmp{os.getpid()}"
    lut = None
    if isinstance(tok, CharTokenizer):
        lut = {ord(c): i for c, i in tok.stoi.items()}
    try:
        with open(tmp, "wb") as out:
            for i, f in enumerate(files):
                if i and tok.eot_id is not None:
                    np.array([tok.eot_id], dtype=dtype).tofile(out)
                    n += 1
                for text, nbytes in _iter_text(f):
                    if lut is not None:
                        cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
                        uniq, inv = np.unique(cps, return_inverse=True)
                        try:
                            mapped = np.array([lut[int(u)] for u in uniq], dtype=dtype)
                        except KeyError as e:
                            raise DataError(
                                f"character {chr(int(e.args[0]))!r} is not in the char vocabulary",
                                "build the vocabulary from this corpus (start a new run)",
                            ) from None
                        arr = mapped[inv]
                    else:
                        ids = tok.enc.encode_ordinary(text) if isinstance(tok, GPT2Tokenizer) else tok.encode(text)
                        arr = np.asarray(ids, dtype=dtype)
                    arr.tofile(out)
                    n += arr.size
                    done += nbytes
                    if progress:
                        progress(done, total)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    with open(meta_path, "w") as m:
        json.dump({"files": [os.path.abspath(f) for f in files], "tokens": n, "dtype": np.dtype(dtype).name,
                   "tokenizer": tok.spec().get("type")}, m)
    return path


def load_tokens(path: str) -> np.ndarray:
    with open(path + ".json") as m:
        meta = json.load(m)
    if meta["tokens"] == 0:
        return np.zeros(0, dtype=meta["dtype"])
    return np.memmap(path, dtype=meta["dtype"], mode="r", shape=(meta["tokens"],))


@dataclass
class Split:
    """Windows over one split of the token array."""

    tokens: np.ndarray
    context: int
    stride: int

    @property
    def n_windows(self) -> int:
        n = len(self.tokens) - self.context
        return 0 if n <= 0 else (n + self.stride - 1) // self.stride

    def batch(self, window_ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        starts = window_ids.astype(np.int64) * self.stride
        idx = starts[:, None] + np.arange(self.context + 1, dtype=np.int64)[None, :]
        chunk = torch.from_numpy(np.asarray(self.tokens[idx], dtype=np.int64))
        return chunk[:, :-1], chunk[:, 1:]


class TextData:
    """Train/val windows of a tokenized corpus, with a resumable shuffled order."""

    def __init__(self, tokens: np.ndarray, context: int, stride: int, val_ratio: float, seed: int) -> None:
        n = len(tokens)
        n_val = int(round(n * val_ratio))
        n_train = n - n_val
        self.train = Split(tokens[:n_train], context, stride)
        self.val = Split(tokens[n_train:], context, stride)
        self.context = context
        self.seed = seed
        self.n_tokens = n
        for name, split in (("train", self.train), ("val", self.val)):
            if split.n_windows < 1:
                other = "raise --val-ratio" if name == "val" else "lower --val-ratio"
                raise DataError(
                    f"{name} split has {len(split.tokens)} tokens, context is {context}",
                    f"lower --context or {other}, or give more text",
                )

    def order(self, epoch: int) -> np.ndarray:
        """The shuffled order of training windows in an epoch (a pure function of seed and epoch)."""
        g = np.random.default_rng([self.seed, epoch])
        return g.permutation(self.train.n_windows)

    def steps_per_epoch(self, global_batch: int) -> int:
        return self.train.n_windows // global_batch

    def train_batch(self, epoch: int, index: int, batch: int, rank: int = 0, world: int = 1,
                    order: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Micro-batch ``index`` of an epoch: global windows [index*batch*world, ...), this rank's share."""
        order = self.order(epoch) if order is None else order
        g0 = index * batch * world + rank * batch
        return self.train.batch(order[g0 : g0 + batch])

    def eval_batches(self, split: str, n_batches: int, batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The first ``n_batches`` batches of a split in order (the same every eval, as in the book)."""
        s = self.train if split == "train" else self.val
        nw = s.n_windows
        for b in range(n_batches):
            ids = np.arange(b * batch, min((b + 1) * batch, nw))
            if ids.size == 0:
                break
            yield s.batch(ids)

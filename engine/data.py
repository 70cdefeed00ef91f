"""Training data: files, folders, globs or named corpora, tokenized once into a memory-mapped cache.

Text files, JSON Lines (``.jsonl``, ``.jsonl.gz``) and parquet shards (see
:mod:`engine.corpora`) are tokenized in parallel into a ``.bin`` token file (uint16 when
the vocabulary fits, else uint32) under the cache directory, keyed by the files' paths,
sizes and modification times, the text field and the tokenizer. Training reads context-length windows
straight from the memory map, so a 1 GB corpus never sits in RAM as Python lists.

Windows follow LLMs-from-scratch: input ``ids[i:i+ctx]``, target ``ids[i+1:i+ctx+1]``
for ``i`` in ``range(0, n - ctx, stride)``. An epoch is one pass over the training
windows in an order shuffled from ``(seed, epoch)``, so any position in any epoch can be
rebuilt exactly on resume.
"""

from __future__ import annotations

import glob
import hashlib
import json
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .corpora import UNIT_BYTES, Encoder, Unit, file_kind, unit_batches, units_of, worker_init, worker_run
from .corpus import DEFAULT_CORPUS, NAMED, REMOTE, cache_dir, fetch
from .errors import DataError
from .tokenizer import CharTokenizer, Tokenizer

if TYPE_CHECKING:
    import torch

TEXT_SUFFIXES = {".txt", ".md", ".text", ".rst", ".tex", ".csv", ".py", ".html", ".xml"}
RECORD_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz", ".parquet")
CHUNK_BYTES = 4 << 20
CACHE_VERSION = "2"
SMALL_CORPUS = 4 << 20  # bytes below which tokenizing uses no worker processes

Progress = Callable[[int, int], None]  # (bytes done, bytes total)


@dataclass
class PrepareStats:
    """Where a tokenization stands: what the progress bar of ``gpt-tui prepare`` shows."""

    done_bytes: int
    total_bytes: int
    documents: int
    tokens: int
    elapsed: float
    reused_bytes: int = 0


Stats = Callable[[PrepareStats], None]


def _is_data_file(name: str) -> bool:
    low = name.lower()
    return os.path.splitext(low)[1] in TEXT_SUFFIXES or low.endswith(RECORD_SUFFIXES)


def _walk(folder: str) -> list[str]:
    found = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for n in sorted(names):
            if not n.startswith(".") and _is_data_file(n):
                found.append(os.path.join(root, n))
    return found


def _expand(entry: str) -> list[str]:
    if entry in NAMED and not os.path.exists(entry):
        remote = REMOTE.get(entry)
        if remote is not None and remote.filename.endswith(".json"):
            _refuse_json(f"corpus {entry!r} ({remote.filename})")
        return [fetch(entry)]
    if not os.path.exists(entry) and glob.has_magic(entry):
        hits = sorted(h for h in glob.glob(entry, recursive=True) if os.path.isfile(h) and _is_data_file(h))
        if not hits:
            raise DataError(f"no data files match {entry}", "check the pattern (quote it so the shell does not expand it)")
        return hits
    if not os.path.exists(entry):
        raise DataError(f"data path {entry} does not exist", f"check the path, or use a named corpus ({', '.join(NAMED)})")
    if os.path.isdir(entry):
        found = _walk(entry)
        if not found:
            raise DataError(f"folder {entry} holds no text files (nor .jsonl, .jsonl.gz or .parquet shards)",
                            f"put text, .jsonl(.gz) or .parquet files in it (text suffixes: {' '.join(sorted(TEXT_SUFFIXES))})")
        return found
    if entry.lower().endswith(".json"):
        _refuse_json(entry)
    return [entry]


def _refuse_json(what: str) -> None:
    raise DataError(
        f"{what} is a .json file, which is not read as training text",
        "give JSON Lines (.jsonl, one object per line with a text field), rename it to .txt to train on it "
        "as raw text, or finetune on an instruction dataset with `gpt-tui finetune --data FILE.json`",
    )


def resolve_sources(data: list[str]) -> list[str]:
    """Expand ``--data`` entries (files, folders, globs, named corpora) into a list of readable data files."""
    if not data:
        data = [DEFAULT_CORPUS]
    files: list[str] = []
    for entry in data:
        files.extend(_expand(entry))
    for f in files:
        if file_kind(f) == "text":
            _check_text_file(f)
        elif os.path.getsize(f) == 0:
            raise DataError(f"data file {f} is empty", "give a file with records in it")
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


def build_char_tokenizer(files: list[str], text_field: str = "text") -> CharTokenizer:
    """One id per character of the corpus; a newline too when documents need a separator."""
    chars: set[str] = set()
    for f in files:
        for u in units_of(f, text_field):
            for batch in unit_batches(u, text_field):
                for doc in batch:
                    chars.update(doc)
    if len(files) > 1 or any(file_kind(f) != "text" for f in files):
        chars.add("\n")  # documents are separated by a blank line
    if not chars:
        raise DataError("the corpus holds no text", "give files with text in them")
    return CharTokenizer(chars)


def _file_key(f: str, tok: Tokenizer, text_field: str) -> str:
    st = os.stat(f)
    field = text_field if file_kind(f) != "text" else ""
    return f"{os.path.abspath(f)}|{st.st_size}|{st.st_mtime_ns}|{field}|{tok.fingerprint()}|v{CACHE_VERSION}"


def _cache_key(files: list[str], tok: Tokenizer, text_field: str = "text") -> str:
    h = hashlib.sha256()
    for f in files:
        h.update((_file_key(f, tok, text_field) + "\n").encode())
    return h.hexdigest()[:24]


def token_cache_path(files: list[str], tok: Tokenizer, text_field: str = "text") -> str:
    """Where the token file of these files and this tokenizer lives (it may not exist yet)."""
    return os.path.join(cache_dir(), "tokens", f"{_cache_key(files, tok, text_field)}.bin")


def _write_meta(path: str, meta: dict) -> None:
    tmp = path + f".tmp{os.getpid()}"
    with open(tmp, "w") as m:
        json.dump(meta, m)
    os.replace(tmp, path)


def tokenize_to_cache(files: list[str], tok: Tokenizer, progress: Progress | None = None, *,
                      text_field: str = "text", stats: Stats | None = None, workers: int | None = None) -> str:
    """Tokenize files into the cached, memory-mapped token file that training reads; its path.

    Work is spread over ``workers`` processes (default: all cores). Each file is first
    tokenized into a part written atomically under ``tokens/parts/``; a failed run keeps
    the finished parts and a re-run reuses them. The parts are then joined (documents and
    files separated by end-of-text) into the cache file and removed.
    """
    path = token_cache_path(files, tok, text_field)
    meta_path = path + ".json"
    if os.path.exists(path) and os.path.exists(meta_path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if workers is None:  # a small corpus is quicker in this process than with workers to start
        small = sum(os.path.getsize(f) for f in files) < SMALL_CORPUS
        workers = 1 if small else os.cpu_count() or 1
    job = _Job(files, tok, text_field, progress, stats, workers)
    parts = job.run(workers)
    try:
        n, docs = _join_parts(parts, path, job.enc)
    except FileNotFoundError:
        if os.path.exists(path) and os.path.exists(meta_path):  # another process joined the same parts first
            return path
        raise
    _write_meta(meta_path, {"files": [os.path.abspath(f) for f in files], "tokens": n, "documents": docs,
                            "dtype": np.dtype(job.enc.dtype).name, "tokenizer": tok.spec().get("type"),
                            "text_field": text_field})
    return path


def _join_parts(parts: list[str], path: str, enc: Encoder) -> tuple[int, int]:
    metas = []
    for p in parts:
        with open(p + ".json") as m:
            metas.append(json.load(m))
    n = sum(m["tokens"] for m in metas) + enc.sep.size * (len(parts) - 1)
    docs = sum(m["documents"] for m in metas)
    if len(parts) == 1:
        os.replace(parts[0], path)
    else:
        tmp = path + f".tmp{os.getpid()}"
        try:
            with open(tmp, "wb") as out:
                for i, p in enumerate(parts):
                    if i:
                        enc.sep.tofile(out)
                    with open(p, "rb") as src:
                        shutil.copyfileobj(src, out, 16 << 20)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    for p in parts:
        for q in (p, p + ".json"):
            if os.path.exists(q):
                os.unlink(q)
    return n, docs


def _remove_spills(folder: str, since: float) -> None:
    """Token files of streamed units that a stopped run left behind."""
    for p in glob.glob(os.path.join(folder, ".unit-*.bin")):
        try:
            if os.path.getmtime(p) >= since - 1:
                os.unlink(p)
        except OSError:
            pass


def _write_ids(ids: np.ndarray | str, out, dtype) -> int:
    """Append a unit's ids (an array, or the file a streamed unit wrote) to ``out``; how many."""
    if isinstance(ids, np.ndarray):
        ids.tofile(out)
        return ids.size
    try:
        with open(ids, "rb") as src:
            shutil.copyfileobj(src, out, 16 << 20)
        return os.path.getsize(ids) // np.dtype(dtype).itemsize
    finally:
        os.unlink(ids)


class _Job:
    """One tokenization: which files still need a part, the workers, the writing of parts."""

    def __init__(self, files: list[str], tok: Tokenizer, text_field: str,
                 progress: Progress | None, stats: Stats | None, workers: int = 1) -> None:
        self.tok, self.text_field, self.progress, self.stats = tok, text_field, progress, stats
        self.enc = Encoder(tok)
        d = os.path.join(cache_dir(), "tokens", "parts")
        os.makedirs(d, exist_ok=True)
        self.spill = d
        self.parts = [os.path.join(d, hashlib.sha256(_file_key(f, tok, text_field).encode()).hexdigest()[:24] + ".bin")
                      for f in files]
        self.total = sum(os.path.getsize(f) for f in files)
        # Units small enough that the workers finish together, large enough to cost nothing to hand out.
        unit_bytes = min(UNIT_BYTES, max(1 << 20, self.total // (8 * workers)))
        self.done = self.docs = self.tokens = 0
        self.reused = 0
        self.units: list[Unit] = []
        self.last_unit: dict[str, int] = {}
        self.part_of: dict[str, str] = {}
        for f, part in zip(files, self.parts, strict=True):
            if os.path.exists(part) and os.path.exists(part + ".json"):
                self.reused += os.path.getsize(f)
                continue
            us = units_of(f, text_field, unit_bytes)
            self.last_unit[f] = len(self.units) + len(us) - 1
            self.part_of[f] = part
            self.units.extend(us)
        self.done = self.reused
        self.t0 = time.perf_counter()
        self.shown = 0.0

    def run(self, workers: int) -> list[str]:
        workers = max(1, min(workers, len(self.units)))
        if not self.units:
            self._report(force=True)
            return self.parts
        if workers == 1:
            worker_init(self.tok.spec(), self.text_field, in_worker=False, spill_dir=self.spill)
            results = map(worker_run, self.units)
            self._consume(results)
        else:
            ctx = multiprocessing.get_context("spawn")
            t0 = time.time()
            with ctx.Pool(workers, initializer=worker_init,
                          initargs=(self.tok.spec(), self.text_field, True, self.spill)) as pool:
                try:
                    self._consume(pool.imap(worker_run, self.units, chunksize=1))
                except BaseException:
                    pool.terminate()
                    _remove_spills(self.spill, t0)
                    raise
        return self.parts

    def _consume(self, results) -> None:
        out = None
        tmp = ""
        n = docs = 0
        try:
            for i, (u, ids, ndocs, err) in enumerate(results):
                if err is not None:
                    raise DataError(*err)
                if u.first:
                    tmp = self.part_of[u.path] + f".tmp{os.getpid()}"
                    out = open(tmp, "wb")  # noqa: SIM115 - closed below, across units
                    n = docs = 0
                assert out is not None
                if u.docs and not u.first and ndocs and self.enc.sep.size:
                    self.enc.sep.tofile(out)
                    n += self.enc.sep.size
                size = _write_ids(ids, out, self.enc.dtype)
                n += size
                docs += ndocs if u.docs else int(u.first)
                self.done += u.nbytes
                self.tokens += size
                self.docs += ndocs if u.docs else int(u.first)
                if i == self.last_unit[u.path]:
                    out.flush()
                    os.fsync(out.fileno())
                    out.close()
                    out = None
                    part = self.part_of[u.path]
                    os.replace(tmp, part)
                    _write_meta(part + ".json", {"tokens": n, "documents": docs})
                self._report(force=i == len(self.units) - 1)
        finally:
            if out is not None:
                out.close()
            if tmp and os.path.exists(tmp):
                os.unlink(tmp)

    def _report(self, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self.shown < 0.2:
            return
        self.shown = now
        if self.progress:
            self.progress(self.done, self.total)
        if self.stats:
            self.stats(PrepareStats(self.done, self.total, self.docs, self.tokens, now - self.t0, self.reused))


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
        import torch  # here, so that tokenizing (gpt-tui prepare) never loads torch

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

"""Corpora as they are distributed: text files, JSON Lines (``.jsonl``, ``.jsonl.gz``) and parquet shards.

Every file is cut into work units (a byte range of a text or ``.jsonl`` file cut at a line
boundary, a whole ``.jsonl.gz`` file, one parquet row group). Worker processes do a unit's
whole job -- read, decode, parse, tokenize -- and hand back a numpy array of token ids, so
the parent only writes arrays in order. A text file is one document; every JSON line or
parquet row is one document. Documents are separated by the tokenizer's separator (GPT-2:
the ``<|endoftext|>`` id; char level: a blank line, ``"\\n\\n"``).

This module imports no torch, so the worker processes start quickly.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .errors import DataError
from .tokenizer import CharTokenizer, GPT2Tokenizer, Tokenizer, tokenizer_from_spec

UNIT_BYTES = 8 << 20
PARQUET_FIX = "pip install 'gpt-tui[data]'"


def file_kind(path: str) -> str:
    """``text``, ``jsonl``, ``jsonl.gz`` or ``parquet``, from the file name."""
    low = path.lower()
    if low.endswith(".parquet"):
        return "parquet"
    if low.endswith((".jsonl.gz", ".ndjson.gz")):
        return "jsonl.gz"
    if low.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    return "text"


def import_pyarrow():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading .parquet files needs pyarrow, which is not installed", PARQUET_FIX) from None
    return pq


@dataclass(frozen=True)
class Unit:
    """One piece of work: a byte range of a text/jsonl file, a whole .jsonl.gz, or a parquet row group."""

    path: str
    kind: str
    start: int  # byte offset (text, jsonl) or row group index (parquet)
    end: int
    nbytes: int  # its share of the file's size, for progress
    first: bool  # the first unit of its file
    docs: bool  # holds whole documents (separated from the previous unit)


def parquet_row_groups(path: str, text_field: str) -> int:
    """Number of row groups of a parquet file whose schema has ``text_field`` (else one clear error)."""
    pq = import_pyarrow()
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds for a bad file
        raise DataError(f"parquet file {path} is corrupt or truncated ({_short(e)})",
                        "download the shard again or remove it") from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise DataError(f"parquet file {path} has no field {text_field!r} (fields: {', '.join(names)})",
                        "choose one with --text-field NAME")
    return pf.metadata.num_row_groups


def units_of(path: str, text_field: str, unit_bytes: int = UNIT_BYTES) -> list[Unit]:
    """The work units of one file."""
    kind = file_kind(path)
    size = os.path.getsize(path)
    if kind == "parquet":
        n = parquet_row_groups(path, text_field)
        share = size // max(1, n)
        return [Unit(path, kind, i, i + 1, share if i < n - 1 else size - share * (n - 1), i == 0, True)
                for i in range(n)]
    if kind == "jsonl.gz":
        return [Unit(path, kind, 0, size, size, True, True)]
    cuts = list(range(0, size, unit_bytes)) + [size]
    return [Unit(path, kind, a, b, b - a, a == 0, kind == "jsonl") for a, b in zip(cuts, cuts[1:], strict=False)]


def separator(tok: Tokenizer) -> list[int]:
    """Ids put between documents: end-of-text, or a blank line for a char vocabulary that has newlines."""
    if tok.eot_id is not None:
        return [tok.eot_id]
    if isinstance(tok, CharTokenizer) and "\n" in tok.stoi:
        return [tok.stoi["\n"]] * 2
    return []


def _short(e: BaseException) -> str:
    s = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return s[:160]


# ---------------------------------------------------------------- reading a unit's documents


def _read_range(path: str, start: int, end: int) -> bytes:
    """Bytes of [start, end) moved to line boundaries: a unit owns the lines that start inside it."""
    with open(path, "rb") as f:
        if start:
            f.seek(start - 1)
            if f.read(1) != b"\n":
                f.readline()  # the line in progress belongs to the previous unit
        begin = f.tell()
        if begin >= end:
            return b""
        data = f.read(end - begin)
        if data and not data.endswith(b"\n"):
            data += f.readline()
    return data


def _decode(data: bytes, path: str, offset: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"data file {path} is not UTF-8 text (bad byte at offset {offset + e.start})",
                        "convert it, e.g. iconv -f latin1 -t utf-8") from None


def _line_number(path: str, offset: int) -> int:
    """1-based line number of a byte offset (counted only when reporting an error)."""
    n = 1
    with open(path, "rb") as f:
        left = offset
        while left > 0:
            block = f.read(min(left, 1 << 20))
            if not block:
                break
            n += block.count(b"\n")
            left -= len(block)
    return n


def _record_text(line: bytes, text_field: str) -> str:
    """The text field of one JSON line (ValueError / KeyError with the reason)."""
    rec = json.loads(line)
    if not isinstance(rec, dict):
        raise ValueError(f"a JSON {type(rec).__name__}, not an object")
    if text_field not in rec:
        raise KeyError(", ".join(map(str, rec)) or "none")
    value = rec[text_field]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"field {text_field!r} is a {type(value).__name__}, not text")
    return value


def _jsonl_docs(lines: list[bytes], path: str, text_field: str, where) -> list[str]:
    docs = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            docs.append(_record_text(line, text_field))
        except KeyError as e:
            raise DataError(f"{path} {where(i)}: no field {text_field!r} (fields: {e.args[0]})",
                            "choose one with --text-field NAME") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise DataError(f"{path} {where(i)} is not a JSON object with text ({_short(e)})",
                            "fix or remove that line, then run again (finished files are kept)") from None
    return docs


def _docs_jsonl(u: Unit, text_field: str) -> list[str]:
    data = _read_range(u.path, u.start, u.end)
    lines = data.split(b"\n")
    first_line: list[int] = []

    def where(i: int) -> str:
        if not first_line:
            first_line.append(_line_number(u.path, _range_begin(u)))
        return f"line {first_line[0] + i}"

    return _jsonl_docs(lines, u.path, text_field, where)


def _range_begin(u: Unit) -> int:
    with open(u.path, "rb") as f:
        if u.start:
            f.seek(u.start - 1)
            if f.read(1) != b"\n":
                f.readline()
        return f.tell()


def _gz_batches(u: Unit, text_field: str, max_bytes: int | None = None) -> Iterator[list[str]]:
    """The documents of a .jsonl.gz, streamed in batches of about ``max_bytes`` of JSON."""
    max_bytes = max_bytes or UNIT_BYTES
    lines: list[bytes] = []
    first = 1  # line number of lines[0]
    size = 0
    try:
        with gzip.open(u.path, "rb") as f:
            for line in f:
                lines.append(line)
                size += len(line)
                if size >= max_bytes:
                    yield _jsonl_docs(lines, u.path, text_field, lambda i, b=first: f"line {b + i}")
                    first += len(lines)
                    lines, size = [], 0
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{u.path} is corrupt or truncated after line {first + len(lines) - 1} ({_short(e)})",
                        "download the shard again or remove it") from None
    if lines:
        yield _jsonl_docs(lines, u.path, text_field, lambda i, b=first: f"line {b + i}")


def _docs_parquet(u: Unit, text_field: str) -> list[str]:
    pq = import_pyarrow()
    try:
        table = pq.ParquetFile(u.path).read_row_group(u.start, columns=[text_field])
        values = table.column(0).to_pylist()
    except Exception as e:  # noqa: BLE001 - corrupt pages surface as several pyarrow errors
        raise DataError(f"parquet file {u.path} row group {u.start} is corrupt or truncated ({_short(e)})",
                        "download the shard again or remove it") from None
    bad = next((v for v in values if v is not None and not isinstance(v, str)), None)
    if bad is not None:
        raise DataError(f"parquet file {u.path}: field {text_field!r} holds {type(bad).__name__}, not text",
                        "choose a text column with --text-field NAME")
    return [v or "" for v in values]


def unit_documents(u: Unit, text_field: str) -> list[str]:
    """The documents (or, for a text file, the piece of its one document) of a unit."""
    if u.kind == "parquet":
        return _docs_parquet(u, text_field)
    if u.kind == "jsonl.gz":
        return [d for batch in _gz_batches(u, text_field) for d in batch]
    if u.kind == "jsonl":
        return _docs_jsonl(u, text_field)
    data = _read_range(u.path, u.start, u.end) if u.start or u.end < os.path.getsize(u.path) else _read_all(u.path)
    return [_decode(data, u.path, u.start)]


def unit_batches(u: Unit, text_field: str) -> Iterator[list[str]]:
    """A unit's documents in bounded batches (a .jsonl.gz is streamed, the other units are bounded already)."""
    if u.kind == "jsonl.gz":
        yield from _gz_batches(u, text_field)
    else:
        yield unit_documents(u, text_field)


def _read_all(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# ---------------------------------------------------------------- tokenizing (in the workers)


class Encoder:
    """Token ids of documents as one numpy array, separators between documents."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok
        self.dtype = np.uint16 if tok.vocab_size <= 65536 else np.uint32
        self.sep = np.asarray(separator(tok), dtype=self.dtype)
        self.lut: np.ndarray | None = None
        if isinstance(tok, CharTokenizer):
            top = max(ord(c) for c in tok.chars) + 1
            self.lut = np.full(top, -1, dtype=np.int64)
            for c, i in tok.stoi.items():
                self.lut[ord(c)] = i

    def encode(self, text: str) -> np.ndarray:
        if self.lut is None:
            if isinstance(self.tok, GPT2Tokenizer):
                return np.asarray(self.tok.enc.encode_ordinary(text), dtype=self.dtype)
            return np.asarray(self.tok.encode(text), dtype=self.dtype)
        cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        ids = self.lut[np.minimum(cps, len(self.lut) - 1)]
        bad = (ids < 0) | (cps >= len(self.lut))
        if bad.any():
            c = chr(int(cps[int(np.argmax(bad))]))
            raise DataError(f"character {c!r} is not in the char vocabulary",
                            "build the vocabulary from this corpus (start a new run)")
        return ids.astype(self.dtype)

    def documents(self, docs: list[str]) -> np.ndarray:
        parts: list[np.ndarray] = []
        for i, d in enumerate(docs):
            if i and self.sep.size:
                parts.append(self.sep)
            parts.append(self.encode(d))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=self.dtype)


_WORKER: dict = {}


def worker_init(spec: dict, text_field: str, in_worker: bool = True, spill_dir: str = "") -> None:
    if in_worker:  # Ctrl+C is the parent's to handle: it stops the pool
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    _WORKER["spill"] = spill_dir or tempfile.gettempdir()
    _WORKER["enc"] = Encoder(tokenizer_from_spec(spec))
    _WORKER["field"] = text_field


def _spill(u: Unit) -> tuple[str, int]:
    """Tokens of a streamed unit written batch by batch to a file of its own: (path, documents)."""
    enc = _WORKER["enc"]
    fd, path = tempfile.mkstemp(dir=_WORKER["spill"], prefix=".unit-", suffix=".bin")
    docs = 0
    try:
        with os.fdopen(fd, "wb") as out:
            for batch in unit_batches(u, _WORKER["field"]):
                if docs and batch and enc.sep.size:
                    enc.sep.tofile(out)
                enc.documents(batch).tofile(out)
                docs += len(batch)
    except BaseException:
        os.unlink(path)
        raise
    return path, docs


def worker_run(u: Unit) -> tuple[Unit, np.ndarray | str | None, int, tuple[str, str | None] | None]:
    """Tokenize a unit: (unit, ids or the path of a file of them, documents, error as (problem, fix))."""
    try:
        if u.kind == "jsonl.gz":
            path, n = _spill(u)
            return u, path, n, None
        docs = unit_documents(u, _WORKER["field"])
        return u, _WORKER["enc"].documents(docs), len(docs), None
    except DataError as e:
        return u, None, 0, (e.problem, e.fix)
    except OSError as e:
        return u, None, 0, (f"cannot read data file {u.path} ({e.strerror or e})", "check the file")

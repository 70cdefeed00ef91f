"""Named corpora: the embedded default and the ones fetched on request into a cache.

``python-docs`` ships with Python itself (the standard library's ``pydoc_data`` module:
the language reference's help topics, about 465 KB of English, PSF licence), so
``gpt-tui train`` works offline on a fresh install. The others are downloaded once into
``$GPT_TUI_CACHE`` (default ``~/.cache/gpt-tui``) and checked against a sha256.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from dataclasses import dataclass

from .errors import DataError

DEFAULT_CORPUS = "python-docs"


@dataclass(frozen=True)
class RemoteCorpus:
    url: str
    sha256: str
    filename: str
    description: str


REMOTE: dict[str, RemoteCorpus] = {
    "the-verdict": RemoteCorpus(
        "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch02/01_main-chapter-code/the-verdict.txt",
        "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f",
        "the-verdict.txt",
        "Edith Wharton, The Verdict (1908), the book's pretraining text",
    ),
    "tinyshakespeare": RemoteCorpus(
        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        "tinyshakespeare.txt",
        "1.1 MB of Shakespeare (char-rnn)",
    ),
    "alpaca": RemoteCorpus(
        "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/01_main-chapter-code/instruction-data.json",
        "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944",
        "instruction-data.json",
        "1,100 Alpaca-format instruction records (the book's ch07 data)",
    ),
}

NAMED = (DEFAULT_CORPUS, *REMOTE)


def cache_dir() -> str:
    d = os.environ.get("GPT_TUI_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "gpt-tui")
    os.makedirs(d, exist_ok=True)
    return d


def python_docs_text() -> str:
    """The embedded default corpus: Python's own help topics (``pydoc_data.topics``)."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # pragma: no cover - stripped Python builds
        raise DataError(
            "the embedded corpus (Python's pydoc_data module) is missing from this Python",
            "give a text file with --data FILE",
        ) from None
    return "\n\n".join(topics[k] for k in sorted(topics))


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(name: str, timeout: float = 20.0) -> str:
    """Path of a named corpus, downloading it into the cache on first use."""
    if name == DEFAULT_CORPUS:
        path = os.path.join(cache_dir(), "python-docs.txt")
        text = python_docs_text()
        if not os.path.exists(path) or os.path.getsize(path) != len(text.encode("utf-8")):
            _write_atomic(path, text.encode("utf-8"))
        return path
    spec = REMOTE.get(name)
    if spec is None:
        raise DataError(f"unknown corpus {name!r}", f"use a file or folder path, or one of {', '.join(NAMED)}")
    path = os.path.join(cache_dir(), "corpora", spec.filename)
    if os.path.exists(path) and sha256_file(path) == spec.sha256:
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        with urllib.request.urlopen(spec.url, timeout=timeout) as r:
            data = r.read()
    except Exception as e:  # noqa: BLE001 - any network failure is the same to the user
        raise DataError(
            f"could not download corpus {name!r} from {spec.url} ({type(e).__name__}: {e})",
            f"connect to the internet, or download it yourself and pass the file with --data (expected at {path})",
        ) from None
    got = hashlib.sha256(data).hexdigest()
    if got != spec.sha256:
        raise DataError(
            f"corpus {name!r} downloaded with sha256 {got[:12]}..., expected {spec.sha256[:12]}...",
            "the source changed or the download was corrupted; try again or pass the file with --data",
        )
    _write_atomic(path, data)
    return path


def _write_atomic(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise

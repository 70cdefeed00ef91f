"""Checkpoint storage: files that are always whole (what they hold is :mod:`.format`'s business).

Layout: ``RUN/checkpoints/step-00001234.pt`` plus ``step-00001234.meta.json``. The ``.pt``
is written to a temporary file, flushed, fsynced and renamed; the ``meta.json`` (step,
losses, sizes, the ``.pt``'s sha256) is written the same way *after* it, so a checkpoint
counts as complete only when its meta exists, and it is used only when the checksum
matches. A complete checkpoint is never overwritten: saving twice at the same step writes
``step-00001234-1.pt`` beside it. Loading uses ``torch.load(weights_only=True)``: nothing
is unpickled beyond tensors and plain types.

``meta.json`` is plain JSON, and listing checkpoints (:func:`list_checkpoints`,
:func:`read_meta`) needs neither torch nor NumPy, so a UI can show them cheaply.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import random
import re
import tempfile
import time
import zipfile
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, BinaryIO

from ..errors import CheckpointError

if TYPE_CHECKING:
    import torch

_NAME = re.compile(r"^step-(\d{8})(?:-(\d+))?\.pt$")
MIN_TORCH = (2, 10)  # weights_only=True has known escapes before this


def ckpt_dir(run_dir: str) -> str:
    """The folder holding a run's checkpoints."""
    return os.path.join(run_dir, "checkpoints")


def meta_path(pt_path: str) -> str:
    """The ``meta.json`` that belongs to a checkpoint file."""
    return pt_path[:-3] + ".meta.json" if pt_path.endswith(".pt") else pt_path + ".meta.json"


def _fsync_dir(d: str) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _HashingWriter:
    """A write-only file wrapper that hashes what passes through and remembers an OSError.

    ``torch.save`` wraps errors of the file object into a RuntimeError; the OSError kept
    here lets a full disk be reported as such.
    """

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.h = hashlib.sha256()
        self.error: OSError | None = None

    def write(self, b: bytes) -> int:
        try:
            n = self.f.write(b)
        except OSError as e:
            self.error = e
            raise
        self.h.update(b)
        return n

    def flush(self) -> None:
        self.f.flush()

    def hexdigest(self) -> str:
        return self.h.hexdigest()


def _write_error(path: str, e: OSError) -> CheckpointError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return CheckpointError(
            f"disk full while writing {path}; the previous checkpoint is intact",
            "free some space (or lower --keep-last) and save again",
        )
    return CheckpointError(f"could not write {path} ({e.strerror or e})", "check the run directory's permissions and space")


def _atomic_write(path: str, write: Callable[[_HashingWriter], Any]) -> str:
    """Write via ``write(fileobj)`` to a temp file beside ``path``, fsync, rename; returns sha256.

    On any failure the temp file is removed and ``path`` is untouched.
    """
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=".part")
    hasher = None
    try:
        with os.fdopen(fd, "wb") as f:
            hasher = _HashingWriter(f)
            write(hasher)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(d)
        return hasher.hexdigest()
    except OSError as e:
        _unlink(tmp)
        raise _write_error(path, e) from None
    except BaseException as e:
        _unlink(tmp)
        if hasher is not None and hasher.error is not None and isinstance(e, Exception):
            raise _write_error(path, hasher.error) from None
        raise


def _unlink(p: str) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass


def write_json_atomic(path: str, obj: Any) -> None:
    """Write JSON to ``path`` atomically (temp file, fsync, rename)."""
    data = json.dumps(obj, indent=2, sort_keys=True).encode()
    _atomic_write(path, lambda f: f.write(data))


# ------------------------------------------------------------------------- RNG
def rng_state() -> dict[str, Any]:
    """Every random stream training draws from: Python, NumPy, torch CPU, CUDA/MPS when used."""
    import numpy as np
    import torch

    st: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": _np_state_to_plain(np.random.get_state()),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    if hasattr(torch, "mps") and torch.backends.mps.is_available():
        try:
            st["mps"] = torch.mps.get_rng_state()
        except Exception:  # noqa: BLE001
            pass
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured (device streams only where that device is present)."""
    import numpy as np
    import torch

    if "python" in st:
        v, state, gauss = st["python"]
        random.setstate((v, tuple(state), gauss))
    if "numpy" in st:
        np.random.set_state(_np_state_from_plain(st["numpy"]))
    if "torch" in st:
        torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        states = st["cuda"][: torch.cuda.device_count()]
        for i, s in enumerate(states):
            torch.cuda.set_rng_state(s, i)
    if "mps" in st and hasattr(torch, "mps") and torch.backends.mps.is_available():
        torch.mps.set_rng_state(st["mps"])


def _np_state_to_plain(s: tuple) -> tuple:
    import numpy as np
    import torch

    return (s[0], torch.from_numpy(np.asarray(s[1], dtype=np.int64)), int(s[2]), int(s[3]), float(s[4]))


def _np_state_from_plain(s: tuple) -> tuple:
    import numpy as np

    return (s[0], s[1].numpy().astype(np.uint32), int(s[2]), int(s[3]), float(s[4]))


# ---------------------------------------------------------------------- saving
def checkpoint_name(run_dir: str, step: int) -> str:
    """A free file name for a checkpoint at ``step`` (``-1``, ``-2`` ... when one exists already)."""
    d = ckpt_dir(run_dir)
    rev = 0
    while True:
        name = f"step-{step:08d}.pt" if rev == 0 else f"step-{step:08d}-{rev}.pt"
        p = os.path.join(d, name)
        if not os.path.exists(p) and not os.path.exists(meta_path(p)):
            return p
        rev += 1


def write_checkpoint(path: str, payload: dict[str, Any], meta: dict[str, Any]) -> str:
    """Write ``payload`` atomically to ``path`` and then its meta.json; returns the path.

    Raises :class:`CheckpointError` (disk full, permissions) with earlier checkpoints intact.
    """
    import torch

    sha = _atomic_write(path, lambda f: torch.save(payload, f))
    meta = dict(meta)
    meta.update(
        {
            "file": os.path.basename(path),
            "sha256": sha,
            "bytes": os.path.getsize(path),
            "saved_at": time.time(),
        }
    )
    try:
        write_json_atomic(meta_path(path), meta)
    except CheckpointError:
        _unlink(path)  # without its meta it would never be used; do not let it take space
        raise
    return path


def read_meta(pt_path: str) -> dict[str, Any] | None:
    """The meta.json of a checkpoint, or None when absent or unreadable (no torch needed)."""
    try:
        with open(meta_path(pt_path), encoding="utf-8") as f:
            m = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(m, dict) or m.get("file", os.path.basename(pt_path)) != os.path.basename(pt_path):
        return None
    return m


def _sort_key(name: str) -> tuple[int, int] | None:
    m = _NAME.match(name)
    return (int(m.group(1)), int(m.group(2) or 0)) if m else None


def list_checkpoints(run_dir: str) -> list[tuple[int, str, dict]]:
    """Complete checkpoints of a run (meta present, size matching) as (step, path, meta), by step."""
    d = ckpt_dir(run_dir)
    try:
        names = os.listdir(d)
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = []
    for n in names:
        key = _sort_key(n)
        if key is None:
            continue
        p = os.path.join(d, n)
        meta = read_meta(p)
        if meta is None:
            continue
        try:
            if os.path.getsize(p) != meta.get("bytes"):
                continue
        except OSError:
            continue
        found.append((key, p, meta))
    found.sort(key=lambda t: t[0])
    return [(key[0], p, meta) for key, p, meta in found]


def by_write_time(cks: list[tuple[int, str, dict]]) -> list[tuple[int, str, dict]]:
    """Checkpoints ordered by when they were written, newest last.

    After resuming from an older checkpoint, the checkpoints of the abandoned continuation
    (later steps, written earlier) count as older than the new branch's.
    """
    def written(c: tuple[int, str, dict]) -> float:
        t = c[2].get("saved_at")
        return t if isinstance(t, (int, float)) else 0.0

    return sorted(cks, key=written)  # stable: ties keep the step order


def best_checkpoint(cks: list[tuple[int, str, dict]]) -> str | None:
    """The checkpoint with the lowest validation loss measured at its own step."""
    scored = [(m["val_loss"], step, p) for step, p, m in cks
              if isinstance(m.get("val_loss"), (int, float)) and m["val_loss"] == m["val_loss"]]
    return min(scored)[2] if scored else None


def prune(run_dir: str, keep_last: int) -> list[str]:
    """Delete all but the ``keep_last`` newest-written complete checkpoints and the best-val one.

    Also removes what interrupted writes left behind: ``.pt`` files without a meta.json
    and temporary files. Call it only from the process that writes the run's checkpoints.
    Returns the deleted checkpoint paths.
    """
    cks = list_checkpoints(run_dir)
    keep = {p for _, p, _ in by_write_time(cks)[-keep_last:]}
    best = best_checkpoint(cks)
    if best:
        keep.add(best)
    deleted = []
    for _, p, _ in cks:
        if p not in keep:
            _unlink(meta_path(p))
            _unlink(p)
            deleted.append(p)
    d = ckpt_dir(run_dir)
    complete = {p for _, p, _ in cks}
    for n in os.listdir(d) if os.path.isdir(d) else []:
        p = os.path.join(d, n)
        if _sort_key(n) is not None and p not in complete and read_meta(p) is None:
            _unlink(p)  # renamed, but killed before its meta.json was written
        elif n.startswith(".tmp-") and n.endswith(".part"):
            try:
                if time.time() - os.path.getmtime(p) > 60:
                    _unlink(p)
            except OSError:
                pass
    return deleted


def check_new_run_dir(run_dir: str) -> None:
    """Refuse to start a new run in a directory that already holds another run's checkpoints."""
    cks = list_checkpoints(run_dir)
    if cks:
        raise CheckpointError(
            f"{run_dir} already holds a run (checkpoints up to step {max(s for s, _, _ in cks)})",
            f"continue it with --resume {run_dir}, or choose another --out",
        )


# --------------------------------------------------------------------- loading
def resolve_checkpoint(path: str) -> str:
    """A checkpoint file from a run directory (newest complete) or a file path."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path} does not exist", "give a run directory or a checkpoint .pt file")
    if os.path.isdir(path):
        cks = list_checkpoints(path)
        if not cks:
            if os.path.exists(os.path.join(path, "config.json")) or os.path.isdir(ckpt_dir(path)):
                raise CheckpointError(
                    f"run {path} has no complete checkpoint",
                    "start a new run without --resume (or wait for the run's first checkpoint)",
                )
            raise CheckpointError(f"{path} is not a gpt-tui run directory (no checkpoints/ with a complete checkpoint)",
                                  "give a run directory made by gpt-tui train, or a .pt file")
        return by_write_time(cks)[-1][1]
    return path


def _check_torch() -> None:
    import torch

    v = tuple(int(x) for x in re.findall(r"\d+", torch.__version__)[:2])
    if v < MIN_TORCH:
        raise CheckpointError(
            f"torch {torch.__version__} has known weights_only loading escapes",
            f"upgrade torch to {MIN_TORCH[0]}.{MIN_TORCH[1]} or newer before loading checkpoints",
        )


def verify_checkpoint(path: str) -> dict[str, Any]:
    """Check that a checkpoint file is complete and unchanged (size and sha256 from its meta.json)."""
    meta = read_meta(path)
    if meta is None:
        raise CheckpointError(
            f"{path} has no readable {os.path.basename(meta_path(path))}: it was not completely written",
            "use an earlier checkpoint of the run",
        )
    size = os.path.getsize(path)
    if size != meta.get("bytes"):
        raise CheckpointError(f"{path} is truncated ({size} of {meta.get('bytes')} bytes)", "use an earlier checkpoint")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    if h.hexdigest() != meta.get("sha256"):
        raise CheckpointError(f"{path} is corrupt (its sha256 does not match its meta.json)", "use an earlier checkpoint")
    return meta


def _load_file(path: str, map_location: str | torch.device, verify: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    import torch

    _check_torch()
    meta = verify_checkpoint(path) if verify else read_meta(path)
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if "Weights only load failed" in str(e) or "Unsupported global" in str(e) or "global" in msg.lower():
            raise CheckpointError(
                f"{path} was refused: loading it needs arbitrary unpickling, which could run code",
                "only load checkpoints written by gpt-tui (or plain tensor files) from sources you trust",
            ) from None
        raise CheckpointError(f"{path} is corrupt ({msg[:120]})", "use an earlier checkpoint") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError, IndexError) as e:
        first = str(e).strip().splitlines()[0][:120] if str(e).strip() else ""
        raise CheckpointError(
            f"{path} is truncated or corrupt ({type(e).__name__}: {first})",
            "use an earlier checkpoint of the run",
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{path} is not a gpt-tui checkpoint",
            "give a checkpoint written by gpt-tui (or import GPT-2 weights with gpt-tui import-gpt2)",
        )
    return obj, meta or {}


def load_raw(path: str, decode: Callable[[dict, str, dict], Any], map_location: str | torch.device = "cpu",
             verify: bool = True) -> tuple[Any, list[str]]:
    """Load a checkpoint file safely (``weights_only=True``), checking completeness and checksum.

    ``path`` is a ``.pt`` file or a run directory. ``decode(obj, path, meta)`` turns the file's
    dict into what the caller wants (a CheckpointError there counts as damage). For a run
    directory the newest complete checkpoint that passes the checks is used; damaged newer ones
    are returned as the second item (and the load fails only when none is usable).
    """
    if not os.path.isdir(path):
        p = resolve_checkpoint(path)
        obj, meta = _load_file(p, map_location, verify)
        return decode(obj, p, meta), []
    resolve_checkpoint(path)  # the errors for an empty or foreign directory
    skipped: list[str] = []
    first_error: CheckpointError | None = None
    for _, p, _ in reversed(by_write_time(list_checkpoints(path))):
        try:
            obj, meta = _load_file(p, map_location, verify)
            return decode(obj, p, meta), skipped
        except CheckpointError as e:
            skipped.append(f"{os.path.basename(p)} ({e.problem})")
            first_error = first_error or e
    assert first_error is not None
    raise first_error

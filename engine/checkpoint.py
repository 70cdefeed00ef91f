"""Checkpoints that are always whole.

Layout: ``RUN/checkpoints/step-00001234.pt`` plus ``step-00001234.meta.json``. The ``.pt``
is written to a temporary file, flushed, fsynced and renamed; the ``meta.json`` (step,
losses, sizes, the ``.pt``'s sha256) is written the same way *after* it, so a checkpoint
counts as complete only when its meta exists and the checksum matches. Loading uses
``torch.load(weights_only=True)``: nothing is unpickled beyond tensors and plain types.
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
from typing import Any

import numpy as np
import torch

from .errors import CheckpointError

FORMAT = "gpt-tui/1"
_NAME = re.compile(r"^step-(\d{8})\.pt$")


def ckpt_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def meta_path(pt_path: str) -> str:
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


def _atomic_write(path: str, write) -> str:
    """Write via ``write(fileobj)`` to a temp file beside ``path``, fsync, rename; returns sha256."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=".part")
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
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CheckpointError(
                f"disk full while writing {path}; the previous checkpoint is intact",
                "free some space (or lower --keep-last) and save again",
            ) from None
        raise CheckpointError(f"could not write {path} ({e.strerror or e})", "check the run directory") from None
    except BaseException:
        _unlink(tmp)
        raise


class _HashingWriter:
    def __init__(self, f) -> None:
        self.f = f
        self.h = hashlib.sha256()

    def write(self, b) -> int:
        self.h.update(b)
        return self.f.write(b)

    def flush(self) -> None:
        self.f.flush()

    def hexdigest(self) -> str:
        return self.h.hexdigest()


def _unlink(p: str) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass


def write_json_atomic(path: str, obj: Any) -> None:
    data = json.dumps(obj, indent=2, sort_keys=True).encode()
    _atomic_write(path, lambda f: f.write(data))


def rng_state() -> dict[str, Any]:
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
    if "python" in st:
        v, state, gauss = st["python"]
        random.setstate((v, tuple(state), gauss))
    if "numpy" in st:
        np.random.set_state(_np_state_from_plain(st["numpy"]))
    if "torch" in st:
        torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])
    if "mps" in st and hasattr(torch, "mps") and torch.backends.mps.is_available():
        torch.mps.set_rng_state(st["mps"])


def _np_state_to_plain(s) -> tuple:
    return (s[0], torch.from_numpy(np.asarray(s[1], dtype=np.int64)), int(s[2]), int(s[3]), float(s[4]))


def _np_state_from_plain(s) -> tuple:
    return (s[0], s[1].numpy().astype(np.uint32), int(s[2]), int(s[3]), float(s[4]))


def save_checkpoint(path: str, payload: dict[str, Any], meta: dict[str, Any]) -> str:
    """Write ``payload`` atomically to ``path`` and then its meta.json; returns the path."""
    payload = dict(payload)
    payload["format"] = FORMAT
    sha = _atomic_write(path, lambda f: torch.save(payload, f))
    meta = dict(meta)
    meta.update(
        {
            "format": FORMAT,
            "file": os.path.basename(path),
            "sha256": sha,
            "bytes": os.path.getsize(path),
            "saved_at": time.time(),
        }
    )
    write_json_atomic(meta_path(path), meta)
    return path


def read_meta(pt_path: str) -> dict[str, Any] | None:
    try:
        with open(meta_path(pt_path)) as f:
            m = json.load(f)
        return m if isinstance(m, dict) else None
    except (OSError, json.JSONDecodeError):
        return None


def list_checkpoints(run_dir: str) -> list[tuple[int, str, dict]]:
    """Complete checkpoints of a run (meta present, size matching), oldest first."""
    d = ckpt_dir(run_dir)
    out = []
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        return []
    for n in names:
        m = _NAME.match(n)
        if not m:
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
        out.append((int(m.group(1)), p, meta))
    out.sort()
    return out


def checkpoint_name(run_dir: str, step: int) -> str:
    return os.path.join(ckpt_dir(run_dir), f"step-{step:08d}.pt")


def prune(run_dir: str, keep_last: int) -> list[str]:
    """Delete all but the last ``keep_last`` checkpoints and the best-val one; returns deleted paths."""
    cks = list_checkpoints(run_dir)
    keep = {p for _, p, _ in cks[-keep_last:]}
    with_val = [(m.get("val_loss"), p) for _, p, m in cks if isinstance(m.get("val_loss"), (int, float))]
    if with_val:
        keep.add(min(with_val)[1])
    deleted = []
    for _, p, _ in cks:
        if p not in keep:
            _unlink(meta_path(p))
            _unlink(p)
            deleted.append(p)
    # leftovers of interrupted writes
    d = ckpt_dir(run_dir)
    for n in os.listdir(d) if os.path.isdir(d) else []:
        if n.startswith(".tmp-") and n.endswith(".part"):
            p = os.path.join(d, n)
            try:
                if time.time() - os.path.getmtime(p) > 60:
                    _unlink(p)
            except OSError:
                pass
    return deleted


def resolve_checkpoint(path: str) -> str:
    """A checkpoint file from a run directory (newest complete) or a file path."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path} does not exist", "give a run directory or a checkpoint .pt file")
    if os.path.isdir(path):
        cks = list_checkpoints(path)
        if not cks:
            if os.path.exists(os.path.join(path, "config.json")):
                raise CheckpointError(
                    f"run {path} has no complete checkpoint",
                    "start a new run without --resume (or wait for the run's first checkpoint)",
                )
            raise CheckpointError(f"{path} is not a gpt-tui run directory (no checkpoints/ with a complete checkpoint)",
                                  "give a run directory made by gpt-tui train, or a .pt file")
        return cks[-1][1]
    return path


def load_checkpoint(path: str, map_location: str | torch.device = "cpu", verify: bool = True) -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``), checking completeness and checksum."""
    path = resolve_checkpoint(path)
    meta = read_meta(path)
    if verify:
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
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e).splitlines()[0] if str(e) else ""
        if "Weights only load failed" in str(e) or "Unsupported global" in str(e):
            raise CheckpointError(
                f"{path} was refused: it needs arbitrary unpickling, which could run code ({msg[:120]})",
                "only load checkpoints written by gpt-tui or plain tensor files",
            ) from None
        raise CheckpointError(f"{path} is corrupt ({msg[:120]})", "use an earlier checkpoint") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(
            f"{path} is truncated or corrupt ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})",
            "use an earlier checkpoint of the run",
        ) from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a gpt-tui checkpoint", "give a checkpoint written by gpt-tui (or import GPT-2 weights with gpt-tui import-gpt2)")
    obj["_path"] = path
    obj["_meta"] = meta or {}
    return obj

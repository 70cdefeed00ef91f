"""Numbers, durations and paths as the screens and the progress lines show them."""

from __future__ import annotations

import os

EMPTY_RESPONSE = "(empty response)"
"""How every screen and progress line shows a model response with no text."""


def fmt_duration(s: float) -> str:
    """90 -> 1m30s; 4000 -> 1h06m."""
    s = int(max(0, s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{sec:02d}s" if m else f"{sec}s")


def fmt_count(n: float) -> str:
    """12,345 -> 12.3k; 1.2e6 -> 1.2M."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n:.0f}"


def axis_scale(max_value: float) -> tuple[float, str]:
    """Divisor and unit name for a tokens axis."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if max_value >= 10 * scale:
            return scale, unit
    return 1.0, ""


def short_path(path: str | None) -> str:
    """A path relative to the working directory when that is shorter."""
    if not path:
        return ""
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return rel if len(rel) < len(path) else path


def clip_left(s: str, n: int) -> str:
    """The last ``n`` characters of ``s``, with an ellipsis when cut (a path's end says the most)."""
    return s if len(s) <= n else "…" + s[-(n - 1):]


def ago(seconds: float) -> str:
    """How long ago, in the largest sensible unit: 42s ago, 5m ago, 3h ago, 2d ago."""
    s = max(0, int(seconds))
    if s < 90:
        return f"{s}s ago"
    if s < 5400:
        return f"{s // 60}m ago"
    if s < 172800:
        return f"{s // 3600}h ago"
    return f"{s // 86400}d ago"


def fmt_value(v: object) -> str:
    """A setting's value as people write it: 0.001 -> 1e-3, 0.0003 -> 3e-4, 0.5 -> 0.5, 50 -> 50, None -> off."""
    if v is None:
        return "off"
    if isinstance(v, float):
        if v != 0 and abs(v) < 0.01:
            mantissa, exp = f"{v:.2e}".split("e")
            return f"{float(mantissa):g}e{int(exp)}"
        return f"{v:.4g}"
    return str(v)

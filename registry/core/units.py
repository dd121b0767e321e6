"""Durations and sizes as written in routes.yaml and the registry API."""

from __future__ import annotations

import math
import re

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_SCALE = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB|KB|MB|GB|K|M|G)?\s*$")
_SIZE_SCALE = {
    None: 1,
    "B": 1,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "K": 1024,
    "M": 1024**2,
    "G": 1024**3,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
}


def parse_duration(value: object) -> float:
    """Seconds from ``500ms``, ``30s``, ``2m``, ``1h`` or a bare number of seconds.

    Raises ValueError with a message fit for a user.
    """
    if isinstance(value, bool):
        raise ValueError(f"invalid duration {value!r}: use e.g. 500ms, 30s, 2m, 1h")
    seconds: float | None = None
    if isinstance(value, (int, float)):
        try:
            seconds = float(value)
        except OverflowError:
            seconds = math.inf
    elif isinstance(value, str):
        match = _DURATION_RE.match(value)
        if match:
            seconds = float(match.group(1)) * _DURATION_SCALE[match.group(2)]
    if seconds is not None:
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"invalid duration {value!r}: must be a finite number >= 0")
        return seconds
    raise ValueError(f"invalid duration {value!r}: use e.g. 500ms, 30s, 2m, 1h")


def parse_size(value: object) -> int:
    """Bytes from ``64KiB``, ``10MiB``, ``1GiB`` or a bare number of bytes."""
    if isinstance(value, bool):
        raise ValueError(f"invalid size {value!r}: use e.g. 64KiB, 10MiB")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"invalid size {value!r}: must be >= 0")
        return value
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        if match:
            return int(match.group(1)) * _SIZE_SCALE[match.group(2)]
    raise ValueError(f"invalid size {value!r}: use e.g. 64KiB, 10MiB")

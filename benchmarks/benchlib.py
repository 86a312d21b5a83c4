"""Small helpers the benchmark scripts share (run them as `python benchmarks/<name>.py`)."""

from __future__ import annotations

import argparse
import contextlib
import math
from pathlib import Path
from typing import Optional


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def percentile(values: list[float], p: float) -> Optional[float]:
    """Nearest-rank percentile of a non-empty list, else None."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def rounded(value: Optional[float], digits: int = 2) -> Optional[float]:
    return None if value is None else round(value, digits)


def tail(path: Path, lines: int) -> str:
    """The last ``lines`` lines of a log file, or "" if it cannot be read."""
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""

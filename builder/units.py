"""Units and human-readable text for every command's output: sizes, counts, durations, index
ranges. The one place that spells GiB, parses `4GB` or `0-3,6` and formats them back."""

from __future__ import annotations

import re
from collections.abc import Iterable

from builder.errors import UserError

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30
TIB = 1 << 40
_SIZE = re.compile(r"\s*([\d.]+)\s*([KMGT]?i?B?)\s*", re.IGNORECASE)
_SIZE_SCALE = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
_SIZE_SCALE |= {"KI": KIB, "MI": MIB, "GI": GIB, "TI": TIB}
_RANGE = re.compile(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?")


def human_bytes(n: float, digits: int = 2) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.{digits}f} {unit}"
        n /= 1024
    raise AssertionError


def gib(n: float, digits: int = 2) -> str:
    """Bytes in GiB at a fixed unit (tables whose rows must compare at a glance)."""
    return f"{n / GIB:,.{digits}f} GiB"


def human_count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return str(int(n))


def parse_size(text: str) -> int:
    """'4GB' -> 4e9, '512MiB' -> 512 x 2**20, '100' -> 100 bytes."""
    match = _SIZE.fullmatch(text)
    if not match:
        raise UserError(f"cannot read size {text!r} (expected e.g. 4GB, 512MiB)")
    return int(float(match[1]) * _SIZE_SCALE[match[2].upper().rstrip("B")])


def duration(seconds: float) -> str:
    """A rough duration: '45 s', '12 min', '3.5 h'."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def clock_text(seconds: float) -> str:
    """An elapsed time as a clock: '4:05', '1:02:03'."""
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def parse_ranges(text: str, count: int, option: str) -> list[int]:
    """'0-3' / '5' / '0-1,6-7' -> sorted unique indices in 0..count-1 (the --ranks and
    --layers syntax); `option` names the flag in the error."""
    found: set[int] = set()
    for part in text.split(","):
        match = _RANGE.fullmatch(part)
        if not match:
            raise UserError(f"{option}: cannot read {part!r} (expected e.g. 0-3 or 0-1,6-7)")
        first, last = int(match[1]), int(match[2] or match[1])
        if first > last or last >= count:
            raise UserError(f"{option}: {part.strip()!r} is outside 0-{count - 1} ({count} in all)")
        found.update(range(first, last + 1))
    return sorted(found)


def format_ranges(values: Iterable[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8' (the inverse of parse_ranges)."""
    parts: list[str] = []
    start = previous = None
    for value in sorted(set(values)):
        if previous is not None and value == previous + 1:
            previous = value
            continue
        if start is not None:
            parts.append(str(start) if start == previous else f"{start}-{previous}")
        start = previous = value
    if start is not None:
        parts.append(str(start) if start == previous else f"{start}-{previous}")
    return ",".join(parts)

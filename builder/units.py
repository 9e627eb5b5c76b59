"""Human-readable sizes and counts, for every command's output."""

from __future__ import annotations


def human_bytes(n: float, digits: int = 2) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.{digits}f} {unit}"
        n /= 1024
    raise AssertionError


def human_count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return str(int(n))

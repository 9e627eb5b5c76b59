"""Progress of a conversion, per rank and in total, over builder.progress (bars on a terminal,
plain lines with done/total, rate and ETA in logs)."""

from __future__ import annotations

from typing import Protocol, Self

from builder.progress import Reporter, reporter

TOTAL = "all ranks"


class ProgressSink(Protocol):
    def add_rank(self, rank: int, total_bytes: int, label: str) -> None: ...

    def advance(self, rank: int, nbytes: int) -> None: ...

    def done(self, rank: int, note: str) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc) -> None: ...


class NullProgress:
    def add_rank(self, rank: int, total_bytes: int, label: str) -> None:
        pass

    def advance(self, rank: int, nbytes: int) -> None:
        pass

    def done(self, rank: int, note: str) -> None:
        pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        pass


class RankProgress:
    """One task per rank (bars only) plus the total (bars and log lines)."""

    def __init__(self, report: Reporter | None = None):
        self.report = report or reporter()
        self._labels: dict[int, str] = {}
        self._left: dict[int, int] = {}
        self._total = 0
        self._done = 0
        self._started = False
        self._finished: set[int] = set()

    def __enter__(self) -> Self:
        self.report.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.report.__exit__(*exc)

    def add_rank(self, rank: int, total_bytes: int, label: str) -> None:
        self._labels[rank] = label
        self._left[rank] = total_bytes
        self._total += total_bytes
        self.report.start(label, total_bytes, "bytes", lines=False)

    def _ensure_total(self) -> None:
        """The total starts with the first bytes, when every rank has been added."""
        if not self._started:
            self._started = True
            self.report.start(TOTAL, self._total, "bytes")

    def _note(self) -> str:
        return f"{sum(1 for v in self._left.values() if v <= 0)}/{len(self._labels)} ranks done"

    def advance(self, rank: int, nbytes: int) -> None:
        self._ensure_total()
        self._left[rank] -= nbytes
        self._done += nbytes
        self.report.advance(self._labels[rank], nbytes)
        self.report.advance(TOTAL, nbytes, note=self._note())

    def done(self, rank: int, note: str) -> None:
        self._ensure_total()
        left, self._left[rank] = max(self._left[rank], 0), 0
        self._done += left
        self.report.finish(self._labels[rank], note=note)
        self._finished.add(rank)
        if len(self._finished) == len(self._labels):
            self.report.finish(TOTAL, note=self._note())
        else:
            self.report.update(TOTAL, self._done, note=self._note())

"""Progress reporting for conversions: a rich bar per rank (bytes/s, ETA) or nothing."""

from __future__ import annotations

from typing import Protocol, Self

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)


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


class RichProgress:
    """One bar per rank plus a total, on stderr so --json output stays clean."""

    def __init__(self, console: Console | None = None):
        self._progress = Progress(
            TextColumn("[bold]{task.description:>12}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[note]}"),
            console=console or Console(stderr=True),
            transient=False,
        )
        self._tasks: dict[int, TaskID] = {}
        self._total: TaskID | None = None

    def __enter__(self) -> Self:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.__exit__(*exc)

    def add_rank(self, rank: int, total_bytes: int, label: str) -> None:
        if self._total is None:
            self._total = self._progress.add_task("total", total=0, note="")
        self._tasks[rank] = self._progress.add_task(label, total=total_bytes, note="")
        task = self._progress.tasks[self._total]
        self._progress.update(self._total, total=(task.total or 0) + total_bytes)

    def advance(self, rank: int, nbytes: int) -> None:
        self._progress.advance(self._tasks[rank], nbytes)
        if self._total is not None:
            self._progress.advance(self._total, nbytes)

    def done(self, rank: int, note: str) -> None:
        task = self._progress.tasks[self._tasks[rank]]
        left = (task.total or 0) - task.completed
        self._progress.update(self._tasks[rank], completed=task.total, note=note)
        if left and self._total is not None:
            self._progress.advance(self._total, left)

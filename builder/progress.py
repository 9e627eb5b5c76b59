"""Progress of long work, one mechanism for every stage (convert, quantize, check, ...).

A stage reports `start(task, total)`, `advance(task, n)` and `finish(task)`; it does not know
where the report goes. On a terminal it becomes rich's bars; anywhere else (a log file, CI, a
batch job) it becomes plain lines on stderr, one at a task's first event, then at least every
`interval` seconds while it runs (a heartbeat thread covers steps that report nothing for a
long time) and one when it ends, each with done/total, percent, rate and ETA:

    quantize: calibrating 12/81 blocks (15%), 0:42 elapsed, ETA 3:58 - block 40 (attn+mlp)

The clock is injectable so the line schedule is tested without sleeping.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Protocol, Self

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from builder import units

INTERVAL_S = 10.0


class Phases:
    """A stage's messages ("writing the FP8 checkpoint") as consecutive tasks of unknown size,
    so that outside a terminal a step that reports no counts still prints a line every
    interval until the next message or the end."""

    def __init__(self, report: Reporter):
        self.report = report
        self.current: str | None = None

    def __call__(self, text: str) -> None:
        self.close()
        self.report.message(text)
        self.current = text
        self.report.start(text, None)

    def close(self) -> None:
        if self.current is not None:
            self.report.finish(self.current)
            self.current = None


class Reporter(Protocol):
    def start(
        self, task: str, total: float, unit: str = "", note: str = "", lines: bool = True
    ) -> None: ...

    def advance(self, task: str, n: float = 1, note: str | None = None) -> None: ...

    def update(
        self, task: str, done: float, total: float | None = None, note: str | None = None
    ) -> None: ...

    def finish(self, task: str, note: str | None = None) -> None: ...

    def message(self, text: str) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc) -> None: ...


@dataclass
class _Task:
    total: float | None
    unit: str
    started: float
    done: float = 0.0
    note: str = ""
    finished: bool = False
    lines: bool = True


class NullReporter:
    """Reports nothing (--json, quiet ranks, library callers that did not ask)."""

    def start(
        self, task: str, total: float, unit: str = "", note: str = "", lines: bool = True
    ) -> None:
        pass

    def advance(self, task: str, n: float = 1, note: str | None = None) -> None:
        pass

    def update(
        self, task: str, done: float, total: float | None = None, note: str | None = None
    ) -> None:
        pass

    def finish(self, task: str, note: str | None = None) -> None:
        pass

    def message(self, text: str) -> None:
        pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        pass


class LineReporter:
    """Plain progress lines for logs: at start, every `interval` s (by `clock`), at the end."""

    def __init__(
        self,
        prefix: str = "",
        stream: IO[str] | None = None,
        interval: float = INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
        heartbeat: bool = True,
    ):
        self.prefix = f"{prefix}: " if prefix else ""
        self.stream = stream
        self.interval = interval
        self.clock = clock
        self._tasks: dict[str, _Task] = {}
        self._last_line = -float("inf")
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True) if heartbeat else None

    # -- the stage's side
    def start(
        self, task: str, total: float, unit: str = "", note: str = "", lines: bool = True
    ) -> None:
        """`lines=False`: a detail task (one rank of several) that only bars show."""
        with self._lock:
            self._tasks[task] = _Task(
                total=total, unit=unit, started=self.clock(), note=note, lines=lines
            )
            if lines and total is not None:
                self._last_line = -float("inf")  # its first event (or the heartbeat) prints it

    def advance(self, task: str, n: float = 1, note: str | None = None) -> None:
        with self._lock:
            state = self._tasks[task]
            self._set(state, state.done + n, None, note)
            self._maybe_emit(task)

    def update(
        self, task: str, done: float, total: float | None = None, note: str | None = None
    ) -> None:
        with self._lock:
            self._set(self._tasks[task], done, total, note)
            self._maybe_emit(task)

    def finish(self, task: str, note: str | None = None) -> None:
        with self._lock:
            state = self._tasks[task]
            self._set(state, state.total if state.total is not None else state.done, None, note)
            state.finished = True
            self._emit(task)

    def message(self, text: str) -> None:
        with self._lock:
            self._last_line = self.clock()
            self._write(f"{self.prefix}{text}")

    def tick(self) -> None:
        """Emit the running task's line if `interval` has passed (the heartbeat calls this)."""
        with self._lock:
            running = [name for name, t in self._tasks.items() if not t.finished and t.lines]
            if running:
                self._maybe_emit(running[-1])

    def __enter__(self) -> Self:
        if self._thread is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout=2)

    # -- formatting
    def line(self, task: str) -> str:
        state = self._tasks[task]
        elapsed = self.clock() - state.started
        done, total = state.done, state.total
        if total is None:  # a phase of unknown size: the heartbeat still shows it is alive
            verb = (
                f"done in {units.clock_text(elapsed)}"
                if state.finished
                else f"{units.clock_text(elapsed)} elapsed"
            )
            return f"{self.prefix}{task}, {verb}"
        if state.unit == "bytes":
            amount = f"{units.human_bytes(done, digits=1)}/{units.human_bytes(total, digits=1)}"
        else:
            amount = f"{done:,.0f}/{total:,.0f}{' ' + state.unit if state.unit else ''}"
        parts = [f"{self.prefix}{task} {amount}"]
        if total:
            parts[0] += f" ({100 * done / total:.0f}%)"
        parts.append(f"{units.clock_text(elapsed)} elapsed")
        if state.finished:
            parts[-1] = f"done in {units.clock_text(elapsed)}"
        elif done and total and elapsed > 0:
            if state.unit == "bytes":
                parts.append(f"{units.human_bytes(done / elapsed, digits=1)}/s")
            parts.append(f"ETA {units.clock_text(elapsed * (total - done) / done)}")
        else:
            parts.append("ETA unknown")
        text = ", ".join(parts)
        return f"{text} - {state.note}" if state.note else text

    # -- internals (called with the lock held)
    @staticmethod
    def _set(state: _Task, done: float, total: float | None, note: str | None) -> None:
        state.done = done
        if total is not None:
            state.total = total
        if note is not None:
            state.note = note

    def _maybe_emit(self, task: str) -> None:
        if self.clock() - self._last_line >= self.interval:
            self._emit(task)

    def _emit(self, task: str) -> None:
        if not self._tasks[task].lines:
            return
        self._last_line = self.clock()
        self._write(self.line(task))

    def _write(self, text: str) -> None:
        stream = self.stream or sys.stderr
        stream.write(text + "\n")
        stream.flush()

    def _beat(self) -> None:
        while not self._stop.wait(min(1.0, self.interval)):
            self.tick()


class _AmountColumn(ProgressColumn):
    """done/total in the task's unit (bytes get binary units and a rate)."""

    def render(self, task) -> Text:
        unit = task.fields.get("unit", "")
        if unit == "bytes":
            done, total = task.completed, task.total or 0
            text = f"{units.human_bytes(done, digits=1)}/{units.human_bytes(total, digits=1)}"
            if task.speed:
                text += f" {units.human_bytes(task.speed, digits=1)}/s"
        else:
            text = (
                ""
                if task.total is None
                else f"{task.completed:,.0f}/{task.total:,.0f}{' ' + unit if unit else ''}"
            )
        return Text(text)


class BarReporter:
    """rich bars on a terminal (stderr, so stdout stays machine-readable)."""

    def __init__(self, prefix: str = "", console: Console | None = None, transient: bool = False):
        self.prefix = prefix
        self.console = console or Console(stderr=True)
        self._bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            _AmountColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[note]}"),
            console=self.console,
            transient=transient,
        )
        self._ids: dict[str, TaskID] = {}

    def start(
        self, task: str, total: float, unit: str = "", note: str = "", lines: bool = True
    ) -> None:
        self._ids[task] = self._bar.add_task(task, total=total, note=note, unit=unit)

    def advance(self, task: str, n: float = 1, note: str | None = None) -> None:
        self._bar.advance(self._ids[task], n)
        if note is not None:
            self._bar.update(self._ids[task], note=note)

    def update(
        self, task: str, done: float, total: float | None = None, note: str | None = None
    ) -> None:
        fields = {"note": note} if note is not None else {}
        if total is not None:
            fields["total"] = total
        self._bar.update(self._ids[task], completed=done, **fields)

    def finish(self, task: str, note: str | None = None) -> None:
        task_id = self._ids[task]
        total = next(t.total for t in self._bar.tasks if t.id == task_id) or 1
        self._bar.update(
            task_id, total=total, completed=total, **({"note": note} if note is not None else {})
        )

    def message(self, text: str) -> None:
        self._bar.console.print(text, markup=False, highlight=False)

    def __enter__(self) -> Self:
        self._bar.start()
        return self

    def __exit__(self, *exc) -> None:
        self._bar.stop()


def reporter(prefix: str = "", enabled: bool = True, stream: IO[str] | None = None) -> Reporter:
    """Bars on a terminal, plain lines otherwise, nothing when not `enabled`."""
    if not enabled:
        return NullReporter()
    target = stream or sys.stderr
    if target.isatty():
        return BarReporter(prefix, Console(file=target))
    return LineReporter(prefix, stream=stream)

"""Worker processes for converting ranks in parallel; importable without torch.

The pool forks its workers from a fork server that imports the converter (and torch) once.
Plain fork from the caller is unsafe once torch or progress threads run; spawn would import
torch again in every worker. Because this module is light, a CLI can start the pool before
it imports torch itself, so the two imports run side by side on different cores.
"""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Self

from builder.convert.progress import NullProgress, ProgressSink
from builder.errors import UserError

PRELOAD = "builder.convert.pipeline"  # what every worker needs; imported once, in the server
_QUEUE = None  # in a worker: where progress goes


def _init_worker(queue) -> None:
    global _QUEUE
    _QUEUE = queue
    import torch

    torch.set_num_threads(1)  # ranks run in parallel; each is copy and hash bound


def _warm_up() -> None:
    pass


def worker_progress(rank: int) -> Callable[[int], None] | None:
    """In a worker: a callback sending (rank, bytes) to the parent's progress sink."""
    if _QUEUE is None:
        return None
    return lambda nbytes: _QUEUE.put((rank, nbytes))


class WorkerPool:
    """`workers` processes plus a thread forwarding their progress to `sink`."""

    def __init__(self, workers: int):
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([PRELOAD])
        self.queue = ctx.Queue()
        self.sink: ProgressSink = NullProgress()
        self._executor: ProcessPoolExecutor | None = None
        self._error: BaseException | None = None
        # Starting the server blocks until it has imported torch: do it beside the caller's
        # own imports and input validation, not before them.
        self._starting = threading.Thread(target=self._start, args=(ctx, workers), daemon=True)
        self._starting.start()
        self._drain = threading.Thread(target=self._forward, daemon=True)
        self._drain.start()

    def _start(self, ctx, workers: int) -> None:
        try:
            self._executor = ProcessPoolExecutor(
                workers, mp_context=ctx, initializer=_init_worker, initargs=(self.queue,)
            )
            for _ in range(workers):
                self._executor.submit(_warm_up)  # start every worker now, not at the first job
        except BaseException as err:  # noqa: BLE001 (reported when the pool is first used)
            self._error = err

    @property
    def executor(self) -> ProcessPoolExecutor:
        self._starting.join()
        if self._executor is None:
            raise UserError(f"could not start the worker processes ({self._error})")
        return self._executor

    def _forward(self) -> None:
        while (message := self.queue.get()) is not None:
            rank, nbytes = message
            self.sink.advance(rank, nbytes)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self._starting.join()
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
        self.queue.put(None)
        self._drain.join(timeout=5)

"""Worker processes for converting ranks in parallel; importable without torch.

A plain conversion (no transform module to preload, torch not imported, this process still
single-threaded) forks its workers straight from the caller, after importing the converter:
they start in milliseconds. Otherwise the pool forks them from a fork server that imports
the converter and the transform's module (e.g. quantize's, with torch) once: plain fork is
unsafe once torch or other threads run, and spawn would import everything again in every
worker. (The fork server costs a fresh interpreter and a second import of the converter,
about 0.3 s of a 2-core machine, which a 2 GB conversion cannot afford.)
"""

from __future__ import annotations

import ctypes
import importlib
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import reduction
from typing import Any, Self

from builder.convert.progress import NullProgress, ProgressSink
from builder.errors import UserError

PRELOAD = "builder.convert.pipeline"  # what every worker needs; imported once, in the server
_QUEUE = None  # in a worker: where progress goes
_INHERITED: list[int] = []  # in a worker: descriptors kept open for its lifetime (stage locks)
PR_SET_PDEATHSIG = 1  # linux/prctl.h
WATCH_SECONDS = 1.0


class _SharedFd:
    """A descriptor handed to a worker as the same open file (SCM_RIGHTS), so an flock taken
    through it is held until the last process holding it exits."""

    def __init__(self, fd: int):
        self.fd = fd

    def __reduce__(self):
        return _identity, (reduction.DupFd(self.fd),)


def _identity(value: Any) -> Any:
    return value


def die_with_parent(owner: int) -> None:
    """In a worker: exit as soon as `owner` (the converting process) is gone.

    Workers are forked by multiprocessing's fork server, so their parent is the server,
    which itself exits when `owner` closes its end (kill -9 included). Linux delivers
    SIGKILL on the parent's death (PR_SET_PDEATHSIG); a thread watching `owner`'s pid covers
    a parent that died before the prctl call and systems without prctl.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if not _alive(owner):
        os._exit(1)
    threading.Thread(target=_watch, args=(owner,), daemon=True, name="owner-watch").start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _watch(owner: int) -> None:
    parent = os.getppid()
    while _alive(owner) and os.getppid() == parent:
        time.sleep(WATCH_SECONDS)
    os._exit(1)


def _init_worker(queue, owner: int, inherited: Sequence[Any]) -> None:
    global _QUEUE
    die_with_parent(owner)
    _QUEUE = queue
    # forked: the descriptors themselves; from the fork server: DupFd, sent over a socket
    _INHERITED.extend(item if isinstance(item, int) else item.detach() for item in inherited)
    torch = sys.modules.get("torch")  # only a transform (quantize) brings it
    if torch is not None:
        torch.set_num_threads(1)  # ranks run in parallel; each is copy and hash bound


def _warm_up() -> None:
    pass


def worker_progress(rank: int) -> Callable[[int], None] | None:
    """In a worker: a callback sending (rank, bytes) to the parent's progress sink."""
    if _QUEUE is None:
        return None
    return lambda nbytes: _QUEUE.put((rank, nbytes))


def can_fork(preload: Sequence[str] = ()) -> bool:
    """Whether workers may be forked from this process: nothing to preload, no torch (its
    thread pools do not survive a fork), and no other thread that could hold a lock."""
    return not preload and "torch" not in sys.modules and threading.active_count() == 1


def server_preload(preload: Sequence[str]) -> list[str]:
    return [PRELOAD, *preload]


def start_fork_server(preload: Sequence[str]) -> threading.Thread:
    """Start the fork server a later WorkerPool(preload=preload) will use, in the background:
    its interpreter start and imports (torch's included: seconds) then run beside the
    caller's own work, e.g. calibration before an export, instead of delaying the pool."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(server_preload(preload))
    from multiprocessing import forkserver

    thread = threading.Thread(target=forkserver.ensure_running, daemon=True, name="fork-server")
    thread.start()
    return thread


class WorkerPool:
    """`workers` processes plus a thread forwarding their progress to `sink`.

    `inherit`: descriptors every worker holds for its lifetime (the stage lock of
    builder.io.atomic, so a resume cannot start while a worker of this run still lives).
    Workers die with this process (see die_with_parent).
    """

    def __init__(self, workers: int, inherit: Sequence[int] = (), preload: Sequence[str] = ()):
        self.sink: ProgressSink = NullProgress()
        self._executor: ProcessPoolExecutor | None = None
        self._error: BaseException | None = None
        if can_fork(preload):
            importlib.import_module(PRELOAD)  # once, here: the workers inherit it
            ctx = multiprocessing.get_context("fork")
            self.queue = ctx.Queue()
            self._inherit: list[Any] = list(inherit)  # a forked child has them already open
            self._starting = threading.Thread(target=lambda: None)
            for stream in (sys.stdout, sys.stderr):  # a child flushes its copy when it exits
                stream.flush()
            self._start(ctx, workers)  # forks now, while this is the only thread
        else:
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(server_preload(preload))
            self.queue = ctx.Queue()
            # Starting the server blocks until it has imported `preload`: do it beside the
            # caller's own imports and input validation, not before them.
            self._inherit = [_SharedFd(fd) for fd in inherit]
            self._starting = threading.Thread(target=self._start, args=(ctx, workers))
            self._starting.daemon = True
        self._starting.start()
        self._drain = threading.Thread(target=self._forward, daemon=True)
        self._drain.start()

    def _start(self, ctx, workers: int) -> None:
        try:
            self._executor = ProcessPoolExecutor(
                workers,
                mp_context=ctx,
                initializer=_init_worker,
                initargs=(self.queue, os.getpid(), self._inherit),
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

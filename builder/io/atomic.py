"""Output directories that appear only when complete, are written by one run at a time, and
never replace or land inside what the run reads.

Every command that writes OUT goes through here:
- `check_output_location(out, inputs)` refuses an OUT that equals, contains or lies inside
  an input (`convert SRC SRC --overwrite` would replace the source).
- `lock_stage(out)` holds an exclusive `flock` on the staging directory `.OUT.partial/`
  for the whole run; a second run on the same OUT is refused naming the process that holds
  it. Worker processes receive the locked descriptor (builder.convert.workers), so the lock
  lasts as long as any of them: a `--resume` never races with orphans of a killed run.
- `atomic_dir(out)` yields the locked, empty staging directory and renames it to OUT only
  if the block succeeds.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from builder.errors import UserError

# A killed run's workers die within milliseconds (parent-death signal); waiting this long
# for them keeps an immediate --resume from failing, while a live run is still refused fast.
LOCK_WAIT_SECONDS = 3.0


def staging_path(out: Path) -> Path:
    out = Path(out)
    return out.with_name(f".{out.name}.partial")


# ---- where an output may go -------------------------------------------------------------------
def check_output_location(out: str | Path, inputs: Iterable[str | Path | None]) -> None:
    """Refuse an OUT that equals, contains or lies inside one of `inputs` (links resolved).

    Replacing or deleting OUT would then destroy the input, and writing into an input
    modifies what the user gave; both are refused whether or not --overwrite is given.
    """
    target = Path(out).resolve()
    for given in inputs:
        if given is None:
            continue
        source = Path(given).resolve()
        if target == source:
            relation = "is the input"
        elif source in target.parents:
            relation = "lies inside the input"
        elif target in source.parents:
            relation = "contains the input"
        else:
            continue
        raise UserError(
            f"{out}: the output {relation} {given}; replacing or writing it would modify the "
            "input. Choose an OUT outside the input directory"
        )


def check_replaceable(out: Path, overwrite: bool) -> None:
    """OUT may be created, or (with --overwrite) replaced only if it is a real directory."""
    if not (out.exists() or out.is_symlink()):
        return
    if not overwrite:
        raise UserError(f"{out}: already exists (pass --overwrite to replace it)")
    if out.is_symlink() or not out.is_dir():
        kind = "a symbolic link" if out.is_symlink() else "a file, not a directory"
        raise UserError(
            f"{out}: is {kind}; --overwrite replaces only an output directory. Remove it or "
            "choose another OUT"
        )


# ---- one run per output ------------------------------------------------------------------------
@dataclass
class StageLock:
    """An flock held on a staging directory (shared by the worker processes it is given to)."""

    stage: Path
    fd: int
    created: bool
    holds: int = 1  # nested lock_stage calls of this process on the same stage


_HELD: dict[Path, StageLock] = {}


@contextmanager
def lock_stage(out: str | Path, *, shared: bool = False) -> Iterator[StageLock]:
    """Create (if needed) and lock `.OUT.partial/` for this run; release it on exit.

    `shared`: runs that each own a disjoint set of ranks (`convert --ranks`) may work side by
    side; a full run takes it exclusively. Reentrant within one process. If this call created
    the directory and the run leaves it empty, it is removed again.
    """
    stage = staging_path(Path(out))
    key = stage.parent.resolve() / stage.name  # one key however the path is spelled
    held = _HELD.get(key)
    if held is not None:
        held.holds += 1
        try:
            yield held
        finally:
            held.holds -= 1
        return
    lock = _acquire(stage, shared)
    _HELD[key] = lock
    try:
        yield lock
    finally:
        del _HELD[key]
        if lock.created and _names_locked_dir(stage, lock.fd):
            try:
                stage.rmdir()  # only if empty: a failed run's finished ranks stay for --resume
            except OSError:
                pass
        os.close(lock.fd)


def _names_locked_dir(stage: Path, fd: int) -> bool:
    try:
        return os.stat(stage).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _acquire(stage: Path, shared: bool) -> StageLock:
    deadline = time.monotonic() + LOCK_WAIT_SECONDS
    while True:
        created = _make_dir(stage)
        fd = os.open(stage, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if time.monotonic() > deadline:
                raise UserError(_busy_message(stage)) from None
            time.sleep(0.1)
            continue
        except BaseException:
            os.close(fd)
            raise
        # A run that just finished renamed the directory it locked to OUT: lock the new one.
        if _names_locked_dir(stage, fd):
            return StageLock(stage, fd, created)
        os.close(fd)


def _make_dir(stage: Path) -> bool:
    try:
        stage.mkdir(parents=True)
    except FileExistsError:
        if not stage.is_dir() or stage.is_symlink():
            raise UserError(f"{stage}: exists and is not a staging directory; remove it") from None
        return False
    return True


def _busy_message(stage: Path) -> str:
    holders = processes_holding(stage)
    who = (
        "; ".join(f"pid {pid}: {command}" for pid, command in holders)
        or "a process on another host?"
    )
    return (
        f"{stage}: another run is writing this output ({who}); wait for it to finish or stop "
        "it, then run again (with --resume to keep its finished parts)"
    )


def processes_holding(path: Path) -> list[tuple[int, str]]:
    """(pid, command line) of the processes of this host with `path` open (Linux /proc)."""
    target = str(path.resolve())
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if any(os.readlink(fd) == target for fd in (entry / "fd").iterdir()):
                raw = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
                command = " ".join(raw.decode(errors="replace").split())  # one line
                found.append((int(entry.name), _shorten(command) or "?"))
        except OSError:  # gone meanwhile, or another user's
            continue
    return sorted(found)


def _shorten(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def clear_dir(directory: Path) -> None:
    """Empty a directory but keep it (its inode carries the lock)."""
    for child in directory.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


# ---- the output directory -----------------------------------------------------------------------
@contextmanager
def atomic_dir(
    out: str | Path, overwrite: bool = False, inputs: Iterable[str | Path | None] = ()
) -> Iterator[Path]:
    """Yield an empty, locked staging directory beside `out`; rename it to `out` only if the
    block succeeds.

    A failed or interrupted run leaves `.NAME.partial`, never a directory that looks complete.
    `inputs`: what the run reads (see check_output_location).
    """
    out = Path(out)
    check_output_location(out, inputs)
    check_replaceable(out, overwrite)
    with lock_stage(out) as lock:
        stage = lock.stage
        clear_dir(stage)
        try:
            yield stage
            replace_dir(stage, out, overwrite)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise


def replace_dir(stage: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished `stage` to `out`, replacing an earlier output only with overwrite."""
    check_replaceable(out, overwrite)
    if out.exists():
        shutil.rmtree(out)
    os.replace(stage, out)

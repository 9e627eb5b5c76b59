"""One run per OUT, and no process outliving the command: through the real CLI, by pid."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from click.testing import CliRunner

from builder.cli import main
from builder.io import atomic

PROCESS_TIMEOUT = 60  # seconds; a bound on a stuck run, never reached when things work


# Installed as sitecustomize.py: the converting process stops itself (SIGSTOP) on entering
# builder.convert.pipeline._run_jobs, i.e. while it holds the stage lock and (with workers)
# once every worker has started, so a test can act at that point however fast the
# conversion would be.
STOP_HOOK = """
import functools, os, signal, time
import builder.convert.pipeline as pipeline

original = pipeline._run_jobs

@functools.wraps(original)
def stopped(jobs, pool, sink):
    if pool is not None:  # every worker up (a pool starts them in the background)
        for _ in range(2):
            [f.result() for f in [pool.executor.submit(time.sleep, 0.1) for _ in range(4)]]
    os.kill(os.getpid(), signal.SIGSTOP)
    return original(jobs, pool, sink)

pipeline._run_jobs = stopped
"""


def stop_hook(tmp_path: Path) -> Path:
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(STOP_HOOK)
    return hook


def stopped(process: subprocess.Popen) -> bool:
    return psutil.Process(process.pid).status() == psutil.STATUS_STOPPED


def builder_process(*args: str, hook: Path | None = None) -> subprocess.Popen:
    """`python -m builder ARGS` of this worktree, in its own process group (`hook`: a folder
    holding a sitecustomize.py to load first)."""
    path = [str(hook)] if hook else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*path, str(Path(__file__).parents[2])])}
    return subprocess.Popen(
        [sys.executable, "-m", "builder", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def wait_for(condition, what: str, timeout: float = PROCESS_TIMEOUT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def tree_hash(root: Path) -> dict[str, str]:
    import hashlib

    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def holders(stage: Path) -> set[int]:
    return {pid for pid, _ in atomic.processes_holding(stage)} if stage.exists() else set()


def run_convert(src: Path, out: Path, *extra: str):
    return CliRunner().invoke(main, ["convert", str(src), str(out), *extra])


def one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


@pytest.fixture
def short_lock_wait(monkeypatch):
    monkeypatch.setattr(atomic, "LOCK_WAIT_SECONDS", 0.3)


def test_workers_die_with_a_killed_conversion_and_resume_completes(tmp_path, ultra_ckpt):
    """kill -9 of `convert --workers 2` while its workers hold the stage lock: every process
    it started (workers, and a fork server and resource tracker if it used them) is gone
    within seconds, and a --resume then finishes the conversion."""
    out = tmp_path / "out"
    stage = tmp_path / ".out.partial"
    source_before = tree_hash(ultra_ckpt)
    parent = builder_process(
        *("convert", str(ultra_ckpt), str(out), "--tp", "4", "--pp", "2", "--workers", "2"),
        "--json",
        hook=stop_hook(tmp_path),
    )
    try:
        me = psutil.Process(parent.pid)

        def workers():  # descendants holding the stage lock (forked, or the fork server's)
            if not stopped(parent):
                return None
            found = [p for p in me.children(recursive=True) if p.pid in holders(stage)]
            return found if len(found) >= 2 else None

        worker_pids = {p.pid for p in wait_for(workers, "two workers holding the stage lock")}
        started = {p.pid for p in me.children(recursive=True)} | worker_pids
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(PROCESS_TIMEOUT)
        alive = {
            pid
            for pid in started
            if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"
        }
        deadline = time.monotonic() + 10  # the parent-death signal arrives in milliseconds
        while alive and time.monotonic() < deadline:
            time.sleep(0.05)
            alive = {
                pid
                for pid in alive
                if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"
            }
        assert not alive, f"processes outlived the killed conversion: {sorted(alive)}"
    finally:
        if parent.poll() is None:
            os.killpg(parent.pid, signal.SIGKILL)
    assert not out.exists() and not holders(stage)
    result = run_convert(ultra_ckpt, out, "--tp", "4", "--pp", "2", "--resume", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["complete"] is True
    assert tree_hash(ultra_ckpt) == source_before


def test_a_second_conversion_on_the_same_out_is_refused(tmp_path, mixed_ckpt, short_lock_wait):
    """The first run stops itself (SIGSTOP) while it holds the lock; the second is refused
    naming it; the first then finishes normally."""
    out = tmp_path / "out"
    stage = tmp_path / ".out.partial"
    hook = stop_hook(tmp_path)
    first = builder_process("convert", str(mixed_ckpt), str(out), "--tp", "2", "--json", hook=hook)
    try:
        wait_for(lambda: stopped(first), "the first run to stop holding the lock")
        assert first.pid in holders(stage)
        line = one_error_line(run_convert(mixed_ckpt, out, "--tp", "2", "--overwrite"))
        assert f"error: {stage}: another run is writing this output (pid {first.pid}:" in line
        assert "builder convert" in line
        os.kill(first.pid, signal.SIGCONT)
        stdout, stderr = first.communicate(timeout=PROCESS_TIMEOUT)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert first.returncode == 0, stderr.decode()
    assert json.loads(stdout)["complete"] is True and (out / "manifest.json").is_file()


def test_resume_refuses_while_an_orphan_holds_the_lock(tmp_path, mixed_ckpt, short_lock_wait):
    """A process that inherited the stage lock (as a worker does) and outlived its parent:
    a --resume must not write beside it. The lock is released when the last holder exits."""
    out = tmp_path / "out"
    holder = (  # takes the lock, hands it to a child, dies without cleaning up (as kill -9)
        "import os, subprocess, sys\n"
        "from builder.io.atomic import lock_stage\n"
        "with lock_stage(sys.argv[1]) as lock:\n"
        "    orphan = subprocess.Popen(['sleep', '60'], pass_fds=[lock.fd], "
        "start_new_session=True,\n"
        "                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
        "    print(orphan.pid, flush=True)\n"
        "    os._exit(0)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run(
        [sys.executable, "-c", holder, str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT,
        check=True,
    )
    orphan = int(done.stdout)
    try:
        line = one_error_line(run_convert(mixed_ckpt, out, "--tp", "2", "--resume"))
        assert f"(pid {orphan}: sleep 60)" in line and "--resume" in line
    finally:
        os.kill(orphan, signal.SIGKILL)
    wait_for(
        lambda: not psutil.pid_exists(orphan) or psutil.Process(orphan).status() == "zombie",
        "the orphan",
    )
    result = run_convert(mixed_ckpt, out, "--tp", "2", "--resume", "--json")
    assert result.exit_code == 0, result.output

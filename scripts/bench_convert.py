#!/usr/bin/env python
"""Benchmark `builder convert` against a plain `cp -r` of the same source bytes.

For each of --sizes (default 0.5, 2 and 8 GB) builds (or reuses) a synthetic Ultra-pattern
checkpoint with `builder synth --target-size`, then runs, --repeat times in alternating
order (A B, B A, ...), each after deleting its own previous output and after putting the
source in the same page-cache state (--cache warm: read whole; cold: evicted with
posix_fadvise DONTNEED, which needs no root and touches no one else's pages):

  cp -r SRC COPY                                   (the floor: read + write every byte)
  builder convert SRC OUT --tp T --workers W       (read, NaN/Inf-check, hash, write ranks)

Each timing starts after a `sync` and ends with an fsync of every file the command wrote (not
a global `sync`, which on a shared machine waits for everyone's dirty pages), so both pay
for getting their bytes to disk; times without it are kept in the JSON too. Peak RSS is the largest
resident set of any single convert process and the largest proportional set size (PSS,
shared library pages counted once) summed over the convert process tree (main process,
workers; psutil, sampled every 250 ms). The 1-minute load average before each command is
printed beside it (the machine may be shared), and so is the CPU time (user + system) of each
command's process tree, which a busy machine inflates less than wall time. The commands run
with Python's bytecode cache on (PYTHONDONTWRITEBYTECODE removed from their environment), as
an installed `builder` has it. Goal (issue 15): convert/cp <= 1.3
at 2 GB on 2 cores and peak RSS <= 1 GiB + 2 x the largest output tensor.

Usage: .venv/bin/python scripts/bench_convert.py [--work /tmp/bench] [--sizes 0.5GB,2GB,8GB]
       [--tp 2] [--workers 2] [--repeat 2] [--cache warm|cold] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
BUILDER = (
    [sys.executable, "-m", "builder.cli"]
    if not (ROOT / ".venv/bin/builder").exists()
    else [str(ROOT / ".venv/bin/builder")]
)
GIB = 2**30


def ensure_source(work: Path, size: str) -> Path:
    src = work / f"src-{size}"
    if (src / "manifest.json").exists():
        print(f"reusing {src}")
        return src
    print(f"writing synthetic checkpoint {src} ({size}) ...", flush=True)
    started = time.perf_counter()
    subprocess.run(
        [
            *BUILDER,
            "synth",
            str(src),
            "--preset",
            "ultra-253b",
            "--target-size",
            size,
            "--overwrite",
        ],
        check=True,
        cwd=CWD,
    )
    print(f"  {time.perf_counter() - started:.0f} s")
    return src


def weight_files(src: Path) -> list[Path]:
    return sorted(src.glob("*.safetensors"))


def warm(src: Path) -> int:
    total = 0
    for path in weight_files(src):
        with open(path, "rb") as handle:
            while chunk := handle.read(64 << 20):
                total += len(chunk)
    return total


class TreeSampler:
    """Largest RSS of any one process, and largest PSS sum, over a process and its descendants
    (workers and their fork server included), sampled every 250 ms in a thread (scanning
    /proc more often steals measurable CPU from the 2-core run it measures)."""

    def __init__(self, pid: int, period: float = 0.25):
        self.pid, self.period, self.peak, self.peak_one = pid, period, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self._stop.is_set():
            try:
                procs = (root, *root.children(recursive=True))
                self.peak_one = max(self.peak_one, *(p.memory_info().rss for p in procs))
                # PSS for the sum: forked workers share the parent's pages
                self.peak = max(self.peak, sum(p.memory_full_info().pss for p in procs))
            except psutil.Error:
                pass
            time.sleep(self.period)

    def stop(self) -> tuple[int, int]:
        self._stop.set()
        self._thread.join()
        return self.peak_one, self.peak


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under `root`: this command's bytes on disk, not every
    dirty page of the (shared) machine as a global `sync` would wait for."""
    for path in [root, *root.rglob("*")]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
# `python -m builder.cli` imports builder from its working directory first: run every command
# in this checkout, so the builder measured is this script's (not the caller's directory's).
CWD = ROOT


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(
    cmd: list[str], out: Path, sample: bool = False
) -> tuple[float, float, tuple[int, int], str, float]:
    """(seconds without the final fsync of `out`, seconds with it, (peak RSS of one process,
    peak PSS of the tree), stdout, CPU seconds of the command's process tree)."""
    os.sync()
    cpu = children_cpu()
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=ENV, cwd=CWD)
    sampler = TreeSampler(proc.pid) if sample else None
    stdout, _ = proc.communicate()
    ran = time.perf_counter() - started
    cpu = children_cpu() - cpu
    peak = sampler.stop() if sampler else (0, 0)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
    fsync_tree(out)
    return ran, time.perf_counter() - started, peak, stdout, cpu


def evict(src: Path) -> None:
    """Drop the source's pages from the page cache (its own clean pages only: no root, and
    nothing of other processes is touched)."""
    for path in weight_files(src):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def prepare(src: Path, cache: str) -> None:
    """The same page-cache state of the source before every timed command."""
    if cache == "warm":
        warm(src)
    else:
        os.sync()
        evict(src)


def bench_size(args, size: str) -> dict:
    src = ensure_source(args.work, size)
    source_bytes = sum(p.stat().st_size for p in weight_files(src))
    copy, out = args.work / f"cp-copy-{size}", args.work / f"converted-{size}"
    rows = []
    summary = {}
    convert_cmd = [
        *BUILDER,
        "convert",
        str(src),
        str(out),
        "--tp",
        str(args.tp),
        "--workers",
        str(args.workers),
        "--json",
    ]
    for run in range(args.repeat):
        # A B A B: alternate the order, and free each command's previous output just before
        # it runs: on a VM, writing into freshly freed page-cache pages is much cheaper than
        # into pages the host has to back again, which otherwise favours whichever runs first.
        results = {}
        for what in ("cp", "convert") if run % 2 == 0 else ("convert", "cp"):
            target = copy if what == "cp" else out
            shutil.rmtree(target, ignore_errors=True)
            os.sync()
            prepare(src, args.cache)
            load = os.getloadavg()[0]
            if what == "cp":
                results["cp"] = (*timed(["cp", "-r", str(src), str(copy)], copy), load)
            else:
                results["convert"] = (*timed(convert_cmd, out, sample=True), load)
        cp, cv = results["cp"], results["convert"]
        summary = json.loads(cv[3])
        rows.append(
            {
                "run": run,
                "order": "cp,convert" if run % 2 == 0 else "convert,cp",
                "cp_s": cp[1],
                "convert_s": cv[1],
                "cp_nosync_s": cp[0],
                "convert_nosync_s": cv[0],
                "convert_inner_s": summary["seconds"],
                "process_rss": cv[2][0],
                "tree_pss": cv[2][1],
                "cp_cpu_s": cp[4],
                "convert_cpu_s": cv[4],
                "load_before_cp": cp[5],
                "load_before_convert": cv[5],
            }
        )
        print(
            f"  {size} run {run}: cp {cp[1]:.2f} s (cpu {cp[4]:.2f} s, load {cp[5]:.1f}), "
            f"convert {cv[1]:.2f} s (cpu {cv[4]:.2f} s, load {cv[5]:.1f}; "
            f"{summary['seconds']:.2f} s inside), ratio {cv[1] / cp[1]:.2f}",
            flush=True,
        )
    check = subprocess.run(
        [*BUILDER, "check", str(out), "--quick"],
        capture_output=True,
        text=True,
        check=False,
        cwd=CWD,
    )
    shutil.rmtree(copy, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    largest = summary["largest_slice_bytes"]
    ratios = [r["convert_s"] / r["cp_s"] for r in rows]
    return {
        "size": size,
        "source_bytes": source_bytes,
        "written_bytes": sum(r["bytes"] for r in summary["ranks"]),
        "runs": rows,
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_median_without_final_sync": statistics.median(
            r["convert_nosync_s"] / r["cp_nosync_s"] for r in rows
        ),
        "cp_s_median": statistics.median(r["cp_s"] for r in rows),
        "convert_s_median": statistics.median(r["convert_s"] for r in rows),
        "cp_cpu_s_median": statistics.median(r["cp_cpu_s"] for r in rows),
        "convert_cpu_s_median": statistics.median(r["convert_cpu_s"] for r in rows),
        "peak_rss_one_process": max(r["process_rss"] for r in rows),
        "peak_pss_process_tree": max(r["tree_pss"] for r in rows),
        "largest_output_tensor_bytes": largest,
        "rss_goal_bytes": GIB + 2 * largest,
        "load_average": [
            min(r["load_before_cp"] for r in rows),
            max(r["load_before_convert"] for r in rows),
        ],
        "check_ok": check.returncode == 0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_convert"))
    parser.add_argument("--sizes", default="0.5GB,2GB,8GB", help="comma-separated sizes")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2, help="rounds per size (A B, then B A)")
    parser.add_argument(
        "--cache",
        choices=["warm", "cold"],
        default="warm",
        help="source state before every timed command: read into the page cache, or evicted "
        "from it (posix_fadvise DONTNEED); the same for cp and convert",
    )
    parser.add_argument("--keep", action="store_true", help="keep the converted outputs")
    parser.add_argument("--json", action="store_true", help="print one JSON object at the end")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    results = []
    for size in args.sizes.split(","):
        results.append(bench_size(args, size.strip()))
    print()
    print(
        f"convert --tp {args.tp} --workers {args.workers} against cp -r of the same source, "
        f"{os.cpu_count()} CPUs, source {args.cache} in the page cache before each command, "
        "each timing ends with an fsync of what it wrote"
    )
    print(
        "| size | cp s | convert s | convert / cp (median, best) | without final fsync | "
        "CPU s cp, convert | peak RSS one process | RSS goal | load avg |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['source_bytes'] / 1e9:.2f} GB | {r['cp_s_median']:.2f} | "
            f"{r['convert_s_median']:.2f} | {r['ratio_median']:.2f}, {r['ratio_min']:.2f} | "
            f"{r['ratio_median_without_final_sync']:.2f} | "
            f"{r['cp_cpu_s_median']:.2f}, {r['convert_cpu_s_median']:.2f} | "
            f"{r['peak_rss_one_process'] / 2**20:.0f} MiB | "
            f"{r['rss_goal_bytes'] / 2**20:.0f} MiB | "
            f"{r['load_average'][0]:.1f}-{r['load_average'][1]:.1f} |"
        )
    failed = [r["size"] for r in results if not r["check_ok"]]
    print(f"builder check --quick: {'ok' if not failed else 'FAILED for ' + ', '.join(failed)}")
    if args.json:
        print(
            json.dumps(
                {
                    "tp": args.tp,
                    "workers": args.workers,
                    "cpus": os.cpu_count(),
                    "cache": args.cache,
                    "sizes": results,
                }
            )
        )


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Benchmark `builder convert` against a plain `cp -r` of the same source bytes.

Builds (or reuses) a synthetic Ultra-pattern checkpoint of --size bytes with `builder synth
--target-size`, reads it once so the page cache is warm, then runs, --repeat times (in
alternating order, each after deleting its own previous output):

  cp -r SRC COPY                                   (the floor: read + write every byte)
  builder convert SRC OUT --tp T --workers W       (read slices, write rank files, sha256)

Each timing starts after a `sync` and includes a final `sync`, so both pay for getting their
bytes to disk; times without the final sync are printed too. Peak RSS is the largest
resident set of any single convert process and the largest proportional set size (PSS,
shared library pages counted once) summed over the convert process tree (main process,
fork server, workers; psutil, sampled every 250 ms). Goal (issue 3): median
convert/cp <= 1.3 and peak RSS <= 1 GiB + 2 x the largest output tensor.

Usage: .venv/bin/python scripts/bench_convert.py [--work /tmp/bench] [--size 4GB] [--tp 2]
       [--workers 2] [--repeat 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
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
                # PSS for the sum: the workers share torch's pages with their fork server
                self.peak = max(self.peak, sum(p.memory_full_info().pss for p in procs))
            except psutil.Error:
                pass
            time.sleep(self.period)

    def stop(self) -> tuple[int, int]:
        self._stop.set()
        self._thread.join()
        return self.peak_one, self.peak


def timed(cmd: list[str], sample: bool = False) -> tuple[float, float, tuple[int, int], str]:
    """(seconds without final sync, seconds with it, (peak RSS of one process, of the tree),
    stdout)."""
    os.sync()
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    sampler = TreeSampler(proc.pid) if sample else None
    out, _ = proc.communicate()
    ran = time.perf_counter() - started
    peak = sampler.stop() if sampler else (0, 0)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
    os.sync()
    return ran, time.perf_counter() - started, peak, out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_convert"))
    parser.add_argument("--size", default="4GB")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print one JSON object at the end")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    src = ensure_source(args.work, args.size)
    source_bytes = sum(p.stat().st_size for p in weight_files(src))
    warm(src)
    copy, out = args.work / "cp-copy", args.work / "converted"
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
        # Alternate the order and free each command's previous output just before it runs: on
        # a VM, writing into freshly freed page-cache pages is much cheaper than into pages the
        # host has to back again, which otherwise favours whichever command runs first.
        results = {}
        for what in ("cp", "convert") if run % 2 == 0 else ("convert", "cp"):
            if what == "cp":
                shutil.rmtree(copy, ignore_errors=True)
                results["cp"] = timed(["cp", "-r", str(src), str(copy)])
            else:
                shutil.rmtree(out, ignore_errors=True)
                results["convert"] = timed(convert_cmd, sample=True)
        cp, cv = results["cp"], results["convert"]
        summary = json.loads(cv[3])
        rows.append(
            {
                "run": run,
                "cp_s": cp[1],
                "convert_s": cv[1],
                "cp_nosync_s": cp[0],
                "convert_nosync_s": cv[0],
                "convert_inner_s": summary["seconds"],
                "process_rss": cv[2][0],
                "tree_rss": cv[2][1],
            }
        )
        print(
            f"run {run}: cp {cp[1]:.2f} s ({cp[0]:.2f} before sync), convert {cv[1]:.2f} s "
            f"({cv[0]:.2f} before sync, {summary['seconds']:.2f} after start-up), "
            f"ratio {cv[1] / cp[1]:.2f}",
            flush=True,
        )
    check = subprocess.run(
        [*BUILDER, "check", str(out), "--quick"], capture_output=True, text=True, check=False
    )
    peak_process = max(r["process_rss"] for r in rows)
    largest = summary["largest_slice_bytes"]
    written = sum(r["bytes"] for r in summary["ranks"])
    ratios = [r["convert_s"] / r["cp_s"] for r in rows]
    ratios_nosync = [r["convert_nosync_s"] / r["cp_nosync_s"] for r in rows]
    result = {
        "source_bytes": source_bytes,
        "written_bytes": written,
        "tp": args.tp,
        "workers": args.workers,
        "runs": rows,
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_median_without_final_sync": statistics.median(ratios_nosync),
        # start-up (interpreter, torch import in the CLI and the workers' fork server) excluded
        "ratio_median_after_startup": statistics.median(
            r["convert_inner_s"] / r["cp_s"] for r in rows
        ),
        "cp_GBps_median": source_bytes / statistics.median(r["cp_s"] for r in rows) / 1e9,
        "convert_GBps_median": written / statistics.median(r["convert_s"] for r in rows) / 1e9,
        "peak_rss_one_process": peak_process,
        "peak_pss_process_tree": max(r["tree_rss"] for r in rows),
        "largest_output_tensor_bytes": largest,
        "rss_goal_bytes": GIB + 2 * largest,
        "check_ok": check.returncode == 0,
        "cpus": os.cpu_count(),
    }
    print()
    print(
        f"source {source_bytes / 1e9:.2f} GB -> {written / 1e9:.2f} GB in {args.tp} rank files, "
        f"{args.workers} workers"
    )
    print(
        f"convert / cp wall time (with final sync): median {result['ratio_median']:.2f}, best "
        f"{result['ratio_min']:.2f}"
        "   (goal <= 1.3); without final sync: median "
        f"{result['ratio_median_without_final_sync']:.2f}"
    )
    print(
        "excluding convert's start-up (Python + torch imports, ~2-5 s): median "
        f"{result['ratio_median_after_startup']:.2f}"
    )
    print(
        f"throughput: cp {result['cp_GBps_median']:.2f} GB/s, convert "
        f"{result['convert_GBps_median']:.2f} GB/s"
    )
    print(
        f"peak RSS: largest process {peak_process / 2**20:.0f} MiB; whole tree (PSS) "
        f"{result['peak_pss_process_tree'] / 2**20:.0f} MiB;"
        f" goal <= 1 GiB + 2 x {largest / 2**20:.0f} MiB = {result['rss_goal_bytes'] / 2**20:.0f} "
        "MiB"
    )
    print(f"builder check --quick: {'ok' if result['check_ok'] else 'FAILED'}")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()

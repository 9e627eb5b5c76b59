#!/usr/bin/env python
"""The regression gate against a real, injected slowdown.

Benches a TensorRT-LLM checkpoint with the executor in one process: as is (BASE), with every
linear delayed by --delay-us microseconds (CURRENT-slow: a real slowdown, measured, not edited
into the records), with every linear delayed by --small-delay-us (CURRENT-small: a slowdown
below the 5% threshold) and as is again (CURRENT-clean), in interleaved rounds of one repeat
each. Then runs `builder report compare BASE CURRENT --max-regression 5%` for each CURRENT and
prints its table and exit code: CURRENT-slow must fail (1: the gate caught it), CURRENT-small
and CURRENT-clean must pass (0).

Usage: python scripts/compare_injected_slowdown.py CHECKPOINT [--out /tmp/gate] [--delay-us 50]
       [--small-delay-us 0.5] [--isl 12] [--osl 4] [--concurrency 1,4] [--repeat 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--out", type=Path, default=Path("/tmp/gate"))
    parser.add_argument("--delay-us", type=float, default=50.0)
    parser.add_argument("--small-delay-us", type=float, default=0.5)
    parser.add_argument("--isl", type=int, default=12)
    parser.add_argument("--osl", type=int, default=4)
    parser.add_argument("--concurrency", default="1,4")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    from builder.bench.inprocess import bench_checkpoint
    from builder.bench.workload import parse_counts, workloads
    from builder.report.records import Metric, write_record
    from builder.runtime.executor import TrtllmCheckpointExecutor

    points = workloads(
        [(args.isl, args.osl)],
        parse_counts(args.concurrency, "--concurrency"),
        None,
        warmup=1,
        repeat=1,
        seed=0,
    )
    original = TrtllmCheckpointExecutor.linear

    def delayed_by(microseconds: float):
        def delayed(self, rank, name, x):
            end = time.perf_counter() + microseconds * 1e-6
            while time.perf_counter() < end:  # busy wait: sleep() granularity is too coarse
                pass
            return original(self, rank, name, x)

        return delayed

    # Rounds alternate base / slow / small / clean, one repeat each, so a load change on a
    # shared machine hits all of them alike instead of landing between two runs.
    runs = {
        "base": original,
        "current-slow": delayed_by(args.delay_us),
        "current-small": delayed_by(args.small_delay_us),
        "current-clean": original,
    }
    rounds: dict[str, list] = {name: [] for name in runs}
    for _ in range(args.repeat):
        for name, linear in runs.items():
            TrtllmCheckpointExecutor.linear = linear
            rounds[name].append(bench_checkpoint(args.checkpoint, points, threads=1))
    TrtllmCheckpointExecutor.linear = original
    for name, per_round in rounds.items():
        for records in zip(*per_round, strict=True):
            first = records[0]
            metrics = {
                key: Metric.from_repeats(
                    [r.metrics[key].value for r in records], m.unit, m.definition, m.better
                )
                for key, m in first.metrics.items()
            }
            settings = {
                **first.settings,
                "repeat": args.repeat,
                "rounds": "interleaved base/slow/clean",
            }
            write_record(
                args.out / name, dataclasses.replace(first, metrics=metrics, settings=settings)
            )
    codes = {}
    for current in ("current-slow", "current-small", "current-clean"):
        command = [
            sys.executable,
            "-m",
            "builder",
            "report",
            "compare",
            str(args.out / "base"),
            str(args.out / current),
            "--max-regression",
            "5%",
        ]
        print(
            f"$ builder report compare {args.out / 'base'} {args.out / current} --max-regression 5%"
        )
        codes[current] = subprocess.run(command, check=False).returncode
        print(f"exit code {codes[current]}\n")
    expected = {"current-slow": 1, "current-small": 0, "current-clean": 0}
    return 0 if codes == expected else 1


if __name__ == "__main__":
    sys.exit(main())

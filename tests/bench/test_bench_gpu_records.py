"""scripts/bench_gpu.py's run records: the committed H200 baseline is what the script writes
from its saved result, and `builder report compare` reads it."""

import json
import subprocess
import sys
from pathlib import Path

from builder.report.records import read_record

ROOT = Path(__file__).resolve().parents[2]
SAVED = ROOT / "scripts/results/h200_bench_gpu.json"
BASELINE = ROOT / "benchmarks/h200-ultra-slice/records"


def _records_from_saved(out: Path) -> list[Path]:
    done = subprocess.run(
        [sys.executable, "scripts/bench_gpu.py", "--records-from", str(SAVED), "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        check=True,
    )
    return [Path(line) for line in done.stdout.split()]


def test_one_record_per_decode_point_with_the_measured_step(tmp_path):
    saved = json.loads(SAVED.read_text())
    paths = _records_from_saved(tmp_path)
    points = [
        (run["tp"], p, d) for run in saved["tp"] for p in ("bf16", "fp8") for d in run[p]["decode"]
    ]
    assert len(paths) == len(points)
    by_key = {}
    for path in paths:
        r = read_record(path)
        by_key[(r.settings["tp"], r.settings["precision"], r.settings["concurrency"])] = r
    for tp, precision, point in points:
        r = by_key[(tp, precision, point["batch"])]
        assert r.metrics["tpot_p50"].value == point["step_ms"]
        assert r.metrics["output_token_throughput"].value == point["batch"] * 1e3 / point["step_ms"]
        assert r.device == saved["environment"]["gpu"]


def test_committed_baseline_matches_the_saved_result_and_compares_clean(tmp_path):
    fresh = {
        (r.artifact.kind, r.settings["concurrency"]): r.metrics
        for r in map(read_record, _records_from_saved(tmp_path))
    }
    committed = {
        (r.artifact.kind, r.settings["concurrency"]): r.metrics
        for r in map(read_record, sorted(BASELINE.glob("*.json")))
    }
    assert committed.keys() == fresh.keys()
    for key, metrics in committed.items():
        assert {k: m.value for k, m in metrics.items()} == {
            k: m.value for k, m in fresh[key].items()
        }
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "builder",
            "report",
            "compare",
            str(BASELINE),
            str(tmp_path / "records"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stdout + done.stderr

"""scripts/bench_gpu.py's run records: the committed H200 baseline is what the script writes
from its saved result, and `builder report compare` reads it."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from builder.report.records import read_record

ROOT = Path(__file__).resolve().parents[2]
SAVED = ROOT / "scripts/results/h200_bench_gpu.json"
# the first run with the W8A16 column (bf16, fp8, w8a16)
SAVED_W8A16 = ROOT / "scripts/results/h200_bench_gpu_w8a16_2026-12-04.json"
BASELINE = ROOT / "benchmarks/h200-ultra-slice/records"


def _records_from_saved(out: Path, saved: Path = SAVED) -> list[Path]:
    done = subprocess.run(
        [sys.executable, "scripts/bench_gpu.py", "--records-from", str(saved), "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        check=True,
    )
    return [Path(line) for line in done.stdout.split()]


@pytest.mark.parametrize("result", [SAVED, SAVED_W8A16], ids=lambda p: p.stem)
def test_one_record_per_decode_point_with_the_measured_step(tmp_path, result):
    saved = json.loads(result.read_text())
    paths = _records_from_saved(tmp_path, result)
    points = [
        (run["tp"], p, d)
        for run in saved["tp"]
        for p in ("bf16", "fp8", "w8a16")
        if p in run
        for d in run[p]["decode"]
    ]
    assert len(points) == (18 if result == SAVED_W8A16 else 12)
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


def test_the_saved_tables_are_what_the_script_prints_from_its_results():
    """The two tables of a run (BF16 / FP8, then W8A16 beside both) from its saved numbers."""
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "scripts/bench_gpu.py")
    bench_gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_gpu)
    saved = json.loads(SAVED_W8A16.read_text())
    assert bench_gpu.table(saved) + "\n\n" + bench_gpu.w8a16_table(saved) == saved["table"]
    assert (
        "| 8 | decode batch 1 ms/step (of copy BW) | 1.812 (94%) | 1.233 (69%) | 1.066 (80%) |"
        in (bench_gpu.w8a16_table(saved))
    )
    # a run of one precision (--precisions w8a16) has no pairs to tabulate, and no error
    for run in saved["tp"]:
        del run["bf16"], run["fp8"]
    assert "| 8 |" not in bench_gpu.table(saved) + bench_gpu.w8a16_table(saved)

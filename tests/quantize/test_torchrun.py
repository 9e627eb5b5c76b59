"""`torchrun --nproc-per-node 2 -m builder quantize --device cpu`: two gloo ranks calibrate
disjoint batches, amax MAX-all-reduced, rank 0 writes; amax.json equals one process's bit for
bit (builder.quantize.blockwise.rank_batches says why it must)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TEXT = "\n\n".join(
    f"Paragraph {n}: the quick brown fox {n * 7} jumps over {n * 13} lazy dogs near the river."
    for n in range(60)
)


def quantize(launcher: list[str], src: Path, out: Path, calib: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    args = [
        *launcher,
        "-m",
        "builder",
        "quantize",
        str(src),
        str(out),
        "--device",
        "cpu",
        "--calib",
        str(calib),
        "--calib-size",
        "8",
        "--calib-seq-len",
        "16",
        "--batch-size",
        "2",
        "--format",
        "hf",
        "--json",
    ]
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("world", [2])
def test_torchrun_two_ranks_equal_one_process(tmp_path, mixed_ckpt, world):
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT)
    one = quantize([sys.executable], mixed_ckpt, tmp_path / "one", calib)
    assert one.returncode == 0, one.stderr[-3000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    two = quantize([*torchrun, f"--nproc-per-node={world}"], mixed_ckpt, tmp_path / "two", calib)
    assert two.returncode == 0, two.stderr[-3000:]
    amax_one = json.loads((tmp_path / "one" / "amax.json").read_text())
    amax_two = json.loads((tmp_path / "two" / "amax.json").read_text())
    assert amax_two == amax_one  # floats parsed from JSON's shortest repr: equal bit for bit
    assert len(amax_one["amax"]) > 10
    summary = json.loads(two.stdout)  # only rank 0 printed its summary
    assert summary["calibration"]["world_size"] == world
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["run"]["calibration"]["world_size"] == world
    assert manifest["run"]["blocks"]["weights"]["bytes"] > 0  # weights streamed, recorded
    # rank 0 alone wrote OUT; no rank files or calibration state left behind
    assert not (tmp_path / ".two.calib").exists() and not (tmp_path / ".two.partial").exists()
    one_files = sorted(p.name for p in (tmp_path / "one").rglob("*"))
    assert sorted(p.name for p in (tmp_path / "two").rglob("*")) == one_files

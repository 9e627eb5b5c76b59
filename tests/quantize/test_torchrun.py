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


def quantize(
    launcher: list[str], src: Path, out: Path, calib: Path, *extra: str
) -> subprocess.Popen:
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
        *extra,
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


def test_torchrun_gptq_sums_the_hessians_over_the_ranks(tmp_path, mixed_ckpt):
    """Under --rounding gptq each rank accumulates X^T X over its batches and the blocks are
    SUM-all-reduced before rank 0 rounds: the codes are one process's up to the fp32
    summation order of H (a different order moves H by ~1e-7 relative, which can flip a
    code that sits on a rounding midpoint, and GPTQ carries a flip along its row), so
    nearly all codes and every scale must agree."""
    import torch
    from safetensors.torch import load_file

    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT)
    gptq = ("--rounding", "gptq", "--recipe", "fp8-pc-pt")
    one = quantize([sys.executable], mixed_ckpt, tmp_path / "one", calib, *gptq)
    assert one.returncode == 0, one.stderr[-3000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    two = quantize(torchrun, mixed_ckpt, tmp_path / "two", calib, *gptq)
    assert two.returncode == 0, two.stderr[-3000:]
    a = load_file(str(tmp_path / "one" / "hf" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "hf" / "model.safetensors"))
    same = total = 0
    for name, t in a.items():
        if t.dtype == torch.float8_e4m3fn:
            same += int((t.view(torch.uint8) == b[name].view(torch.uint8)).sum())
            total += t.numel()
        elif name.endswith("weight_scale"):
            assert torch.equal(t, b[name]), name
    assert total > 0 and same / total > 0.99

#!/usr/bin/env python
"""Peak memory of `builder quantize` against checkpoint size, measured in a fresh process.

Writes a synthetic nemotron-nas checkpoint of --size (Ultra's block pattern, layers 0-40,
hidden grown to reach the size) unless --src is given, then quantizes it (both exports) in a
child process and prints one JSON line: checkpoint bytes, the child's RSS after importing
torch, transformers and ModelOpt (baseline; the kernel's peak-RSS mark is reset there), its
peak RSS during the run (VmHWM), and the seconds taken. Linux only.

  .venv/bin/python scripts/quantize_memory.py --size 1.5GB
  .venv/bin/python scripts/quantize_memory.py --src HF_DIR --calib-size 8 --calib-seq-len 128
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import json, sys, time
import builder.model  # noqa: F401  (torch, transformers, the reference model)
from builder.quantize import recipe
from builder.quantize.pipeline import quantize_checkpoint

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

recipe.mtq()  # ModelOpt imported too: the baseline holds every library and no model
with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")  # reset the peak (VmHWM): import-time transients do not hide the run's
baseline = status("VmRSS")
started = time.perf_counter()
summary = quantize_checkpoint(sys.argv[1], sys.argv[2], calib_size=int(sys.argv[3]),
                              calib_seq_len=int(sys.argv[4]), batch_size=2, device=sys.argv[5])
print(json.dumps({"checkpoint_bytes": summary.model_bytes, "baseline_rss": baseline,
                  "peak_rss": status("VmHWM"), "peak_gpu": summary.peak_gpu_bytes,
                  "seconds": round(time.perf_counter() - started, 2), "steps": summary.seconds,
                  "blocks": summary.blocks}))
"""


def measure(
    src: Path, out: Path, calib_size: int = 2, calib_seq_len: int = 16, device: str = "cpu"
) -> dict:
    """Quantize `src` into `out` in a child process; its memory and time as a dict."""
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            CHILD,
            str(src),
            str(out),
            str(calib_size),
            str(calib_seq_len),
            device,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"quantize failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def synthetic(out: Path, size_bytes: int) -> Path:
    from builder.synth import SynthSpec, write_synthetic

    spec = SynthSpec(preset="ultra-253b", layers="0-40", target_bytes=size_bytes)
    return write_synthetic(out, spec, shard_bytes=256 * 2**20)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--src", type=Path)
    parser.add_argument("--size", default="1.5GB", help="synthetic checkpoint size (without --src)")
    parser.add_argument("--work", type=Path)
    parser.add_argument("--calib-size", type=int, default=2)
    parser.add_argument("--calib-seq-len", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    from builder.units import parse_size

    work = args.work or Path(tempfile.mkdtemp(prefix="quantize-memory-"))
    src = args.src or synthetic(work / "synthetic", parse_size(args.size))
    result = measure(src, work / "fp8", args.calib_size, args.calib_seq_len, args.device)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Block streaming with and without prefetch (builder/io/prefetch.py), measured side by side.

Writes a synthetic checkpoint of --size (Ultra's block pattern, layers 0-40, hidden grown to
reach the size) unless --src is given, reads it once so every run finds it in the page cache,
then runs in fresh child processes, alternating prefetch off / on for --rounds rounds:

  calibration  builder.quantize.blockwise.calibrate_blockwise over --calib-size random
               windows of --seq-len tokens (what `builder quantize` calibrates with)
  golden       builder.verify.stream.BlockStream.forward over --sequences sequences, blocks
               not kept (what `builder reference` and the hf runtime stream)

Each child reports wall seconds of the pass, weight bytes streamed and GB/s, the seconds
spent loading and waiting for loads, and its peak RSS above the baseline after imports
(VmHWM, reset after import) or peak GPU memory. Results must be bit-identical: the child
hashes its amax table / hidden states and the parent compares them across runs. Median per
mode and the on/off ratio are printed, JSON written with --json.

  python scripts/bench_prefetch.py --size 1.5GB --json scripts/results/prefetch-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import hashlib, json, sys, time
import torch
import builder.model  # noqa: F401
from builder.quantize import recipe

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

mode, src, prefetch, device = sys.argv[1], sys.argv[2], sys.argv[3] == "on", sys.argv[4]
size, seq_len, sequences, threads = (int(v) for v in sys.argv[5:9])
torch.set_num_threads(threads)
recipe.mtq()
gen = torch.Generator().manual_seed(0)
from builder.arch import load_plan
from builder.io.checkpoint import HFCheckpoint
plan = load_plan(src)
if mode == "calibration":
    from builder.quantize.blockwise import CalibOptions, calibrate_blockwise
    from builder.quantize.pipeline import reference_parts
    parts = reference_parts(src)
    windows = torch.randint(5, 900, (size, seq_len), generator=gen)
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    baseline = status("VmRSS")
    opts = CalibOptions(device=device, batch_size=2, prefetch=prefetch)
    result = calibrate_blockwise(HFCheckpoint(src), plan, parts, windows, opts)
    weights = result.summary()["weights"]
    digest = hashlib.sha256(json.dumps(result.table.values, sort_keys=True).encode()).hexdigest()
else:
    from builder.verify.stream import BlockStream, Sequence
    stream = BlockStream(src, torch.bfloat16, device, keep_blocks=False, prefetch=prefetch)
    ids = [torch.randint(5, 900, (seq_len,), generator=gen) for _ in range(sequences)]
    seqs = [Sequence(torch.empty(0, dtype=torch.long)) for _ in ids]
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    baseline = status("VmRSS")
    hidden = stream.forward(seqs, ids)
    weights = stream.streaming()
    digest = hashlib.sha256(b"".join(h.float().cpu().numpy().tobytes() for h in hidden)).hexdigest()
peak_gpu = int(torch.cuda.max_memory_allocated()) if device.startswith("cuda") else None
print(json.dumps({"weights": weights, "peak_rss_above_baseline": status("VmHWM") - baseline,
                  "baseline_rss": baseline, "peak_gpu_bytes": peak_gpu, "sha256": digest}))
"""


def parse_size(text: str) -> int:
    units = {"GB": 10**9, "MB": 10**6}
    for unit, factor in units.items():
        if text.upper().endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def run_child(mode: str, src: Path, prefetch: bool, args) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")
    command = [
        sys.executable,
        "-c",
        CHILD,
        mode,
        str(src),
        "on" if prefetch else "off",
        args.device,
        str(args.calib_size),
        str(args.seq_len),
        str(args.sequences),
        str(args.threads),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{mode} child failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarize(runs: list[dict]) -> dict:
    def median(key: str) -> float:
        return statistics.median(r["weights"][key] for r in runs)

    return {
        "wall_seconds": median("wall_seconds"),
        "stream_gb_per_s": median("stream_gb_per_s"),
        "load_seconds": median("load_seconds"),
        "wait_seconds": median("wait_seconds"),
        "bytes": runs[0]["weights"]["bytes"],
        "peak_rss_above_baseline": statistics.median(r["peak_rss_above_baseline"] for r in runs),
        "peak_gpu_bytes": runs[0]["peak_gpu_bytes"],
        "runs": [r["weights"]["wall_seconds"] for r in runs],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--src", type=Path, default=None)
    parser.add_argument("--size", default="1.5GB")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mode", choices=["calibration", "golden", "both"], default="both")
    parser.add_argument("--calib-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--sequences", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        src = args.src
        if src is None:
            sys.path.insert(0, str(REPO))
            from builder.synth import SynthSpec, write_synthetic

            spec = SynthSpec(preset="ultra-253b", layers="0-40", target_bytes=parse_size(args.size))
            src = write_synthetic(Path(tmp) / "src", spec, shard_bytes=256 * 2**20)
        files = sorted(src.glob("*.safetensors"))
        for path in files:  # warm the page cache: every run reads from memory, not the disk
            with path.open("rb") as handle:
                while handle.read(64 << 20):
                    pass
        result = {
            "checkpoint_bytes": sum(p.stat().st_size for p in files),
            "device": args.device,
            "threads": args.threads,
            "cores": len(os.sched_getaffinity(0)),
            "load_average_before": os.getloadavg(),
        }
        modes = ["calibration", "golden"] if args.mode == "both" else [args.mode]
        for mode in modes:
            runs: dict[str, list[dict]] = {"off": [], "on": []}
            for _ in range(args.rounds):
                for setting in ("off", "on"):
                    runs[setting].append(run_child(mode, src, setting == "on", args))
            digests = {r["sha256"] for rs in runs.values() for r in rs}
            off, on = summarize(runs["off"]), summarize(runs["on"])
            result[mode] = {
                "prefetch_off": off,
                "prefetch_on": on,
                "speedup": round(off["wall_seconds"] / on["wall_seconds"], 3),
                "bit_identical": len(digests) == 1,
            }
            print(
                f"{mode}: off {off['wall_seconds']:.2f} s ({off['stream_gb_per_s']} GB/s), "
                f"on {on['wall_seconds']:.2f} s ({on['stream_gb_per_s']} GB/s), "
                f"x{result[mode]['speedup']}, peak RSS above baseline "
                f"{off['peak_rss_above_baseline'] / 2**20:,.0f} / "
                f"{on['peak_rss_above_baseline'] / 2**20:,.0f} MiB, "
                f"bit-identical {result[mode]['bit_identical']}",
                file=sys.stderr,
            )
        result["load_average_after"] = os.getloadavg()
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Digests of everything a refactor must not change, written by whichever `builder` is on
PYTHONPATH: run it with an old tree and the new one and diff the two outputs.

    git archive <old-rev> builder | tar -x -C /tmp/old
    PYTHONPATH=/tmp/old python scripts/artifact_digests.py > old.txt
    PYTHONPATH=$PWD     python scripts/artifact_digests.py > new.txt
    diff old.txt new.txt && echo identical

It writes, into a temporary directory: the synthetic `mixed` checkpoint (every block kind);
a seeded amax table over its expected quantizers; the BF16 TensorRT-LLM checkpoint at tp 2
pp 2; the FP8 TensorRT-LLM checkpoint at tp 2; the unified HF FP8 checkpoint; with
`--smollm2`, the SmolLM2 NAS-variant import. It prints sha256 prefixes of the quantizer key
lists, the amax views, every weight and config file, and of the reference executor's logits
(one forward and a cached greedy run) on both TensorRT-LLM checkpoints.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
from pathlib import Path

import torch

from builder.arch import load_plan
from builder.convert import convert_checkpoint
from builder.io.checkpoint import HFCheckpoint
from builder.quantize.amax import AmaxTable, expected_keys
from builder.quantize.export_hf import write_unified_hf
from builder.quantize.export_trtllm import trtllm_effective_table, write_trtllm_fp8
from builder.runtime.executor import TrtllmCheckpointExecutor
from builder.synth import SynthSpec, write_synthetic


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def json_digest(value) -> str:
    return digest(json.dumps(value, sort_keys=True).encode())


def file_digests(directory: Path) -> list[str]:
    names = ("config.json", "hf_quant_config.json")
    return [
        f"{directory.name} {f.name} {digest(f.read_bytes())}"
        for f in sorted(directory.iterdir())
        if f.suffix == ".safetensors" or f.name in names
    ]


def seeded_table(plan) -> tuple[AmaxTable, list[str]]:
    table, lines = AmaxTable(kv_cache=True), []
    for layer in plan.layers:
        keys = expected_keys(plan, layer, True)
        lines.append(f"keys layer {layer.index} {digest(chr(10).join(keys).encode())}")
        table.update({k: 0.5 + 0.01 * ((n * 7 + layer.index) % 13) for n, k in enumerate(keys)})
    return table, lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smollm2", action="store_true", help="also import SmolLM2 (slow)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="digests-"))
    src = write_synthetic(root / "mixed", SynthSpec(preset="mixed"))
    plan = load_plan(src)
    table, lines = seeded_table(plan)
    lines.append(f"amax per_layer {json_digest(table.per_layer())}")
    lines.append(f"amax effective {json_digest(trtllm_effective_table(table, plan).to_json())}")
    convert_checkpoint(src, root / "bf16", 2, 2)
    write_trtllm_fp8(src, root / "fp8", table, tp=2, pp=1)
    (root / "hf8").mkdir()
    write_unified_hf(root / "hf8", plan, HFCheckpoint(src), table)
    for name in ("mixed", "bf16", "fp8", "hf8"):
        lines += file_digests(root / name)
    ids = torch.randint(0, plan.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    for name in ("bf16", "fp8"):
        with TrtllmCheckpointExecutor(root / name, dtype=torch.float32) as ex:
            logits = ex(ids)
            run = ex.greedy([[1, 2, 3], [4, 5]], 4, keep_logits=True)
        blob = logits.numpy().tobytes() + b"".join(t.numpy().tobytes() for t in run.logits)
        lines.append(f"{name} executor logits {digest(blob)} tokens {run.tokens}")
    if args.smollm2:
        from builder.smollm2 import import_smollm2

        lines += file_digests(import_smollm2(root / "smollm2-nas", nas_variant=True))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

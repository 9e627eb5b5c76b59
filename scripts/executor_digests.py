"""Digests of the reference executor's logits over every linear format, written by whichever
`builder` is on PYTHONPATH: run it with an old tree and the new one and diff the outputs.

    git archive <old-rev> builder | tar -x -C /tmp/old
    PYTHONPATH=/tmp/old python scripts/executor_digests.py > old.txt
    PYTHONPATH=$PWD     python scripts/executor_digests.py > new.txt
    diff old.txt new.txt && echo identical

From the synthetic `mixed` checkpoint (every block kind) and a seeded amax table it writes
TensorRT-LLM checkpoints in every format mix: BF16 (tp 1; tp 2 pp 2), per-tensor FP8,
per-channel FP8 and a mixed recipe cycling fp8 / fp8-pc-pt / bf16 over the units (tp 1 and
tp 2 each). For each it prints the sha256 prefix of the executor's logits (one forward plus a
KV-cached greedy run) in float32 and bfloat16, streamed and with `keep_weights`, and with
`--distributed` the two-process gloo executor's decode at tp 2 as well. Scripts/
artifact_digests.py covers the conversion outputs; this one the execution.
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from builder.arch import load_plan
from builder.convert import convert_checkpoint
from builder.io.checkpoint import HFCheckpoint
from builder.quantize.amax import AmaxTable, expected_keys
from builder.quantize.export_trtllm import write_trtllm_fp8, write_trtllm_recipe
from builder.quantize.formats import LinearFormat, Recipe, model_units
from builder.runtime.executor import TrtllmCheckpointExecutor
from builder.synth import SynthSpec, write_synthetic

PROMPTS = [[1, 2, 3], [4, 5]]


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def seeded_table(plan) -> AmaxTable:
    table = AmaxTable(kv_cache=True)
    for layer in plan.layers:
        keys = expected_keys(plan, layer, True)
        table.update({k: 0.5 + 0.01 * ((n * 7 + layer.index) % 13) for n, k in enumerate(keys)})
    return table


def every_format(plan) -> Recipe:
    cycle = (LinearFormat.FP8, LinearFormat.FP8_PC_PT, LinearFormat.BF16)
    return Recipe(LinearFormat.FP8, {u.key: cycle[i % 3] for i, u in enumerate(model_units(plan))})


def checkpoints(root: Path) -> dict[str, Path]:
    src = write_synthetic(root / "mixed", SynthSpec(preset="mixed"))
    plan, ckpt = load_plan(src), HFCheckpoint(src)
    table = seeded_table(plan)
    out = {}
    for tp, pp in ((1, 1), (2, 2)):
        out[f"bf16-tp{tp}pp{pp}"] = root / f"bf16-tp{tp}pp{pp}"
        convert_checkpoint(src, out[f"bf16-tp{tp}pp{pp}"], tp, pp)
    for tp in (1, 2):
        out[f"fp8-tp{tp}"] = root / f"fp8-tp{tp}"
        write_trtllm_fp8(src, out[f"fp8-tp{tp}"], table, tp=tp)
        for name, recipe in (
            ("pc", Recipe.uniform(LinearFormat.FP8_PC_PT)),
            ("mixed", every_format(plan)),
        ):
            out[f"{name}-tp{tp}"] = root / f"{name}-tp{tp}"
            write_trtllm_recipe(src, out[f"{name}-tp{tp}"], table, recipe, plan, ckpt, tp=tp)
    return out


def executor_digest(directory: Path, dtype: torch.dtype, **kwargs) -> str:
    with TrtllmCheckpointExecutor(directory, dtype=dtype, **kwargs) as ex:
        ids = torch.randint(
            0, ex.plan.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0)
        )
        logits = ex(ids)
        run = ex.greedy(PROMPTS, 4, keep_logits=True)
    blob = logits.numpy().tobytes() + b"".join(t.numpy().tobytes() for t in run.logits)
    return f"{digest(blob)} tokens {run.tokens}"


def dense_hook(call) -> torch.Tensor:
    """A hook that runs any 16-bit linear itself (the hook path, not the built-in GEMMs)."""
    return F.linear(call.x, call.tensor("weight").to(call.x.dtype))


def distributed_digest(directory: Path, dtype: str, out: Path) -> str:
    from builder.runtime.distributed import launch_local, load_run, tp_decode_worker

    launch_local(2, "cpu", tp_decode_worker, (str(directory), PROMPTS, 4, dtype, 1, str(out)))
    run = load_run(out)
    return f"{digest(b''.join(t.numpy().tobytes() for t in run.logits))} tokens {run.tokens}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--distributed", action="store_true", help="also 2-process gloo (tp 2)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="executor-digests-"))
    lines = []
    for name, directory in checkpoints(root).items():
        for dtype in (torch.float32, torch.bfloat16):
            for keep in (False, True):
                result = executor_digest(directory, dtype, keep_weights=keep)
                lines.append(f"{name} {str(dtype)[6:]} keep={keep} {result}")
        if name.startswith("bf16"):
            hooked = executor_digest(directory, torch.float32, linear_hook=dense_hook)
            lines.append(f"{name} float32 hook {hooked}")
        if args.distributed and name.endswith("tp2"):
            for dtype in ("float32", "bfloat16"):
                result = distributed_digest(directory, dtype, root / f"dist-{name}-{dtype}")
                lines.append(f"{name} {dtype} distributed {result}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

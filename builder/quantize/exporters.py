"""The export formats of `builder quantize`, by name: each writes one FP8 checkpoint into the
staging directory from the calibrated amax table.

Importing this module is cheap (no torch): the CLI's `--format` choices are EXPORTERS' keys.
A new format is one decorated function here.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from builder.registry import Registry

if TYPE_CHECKING:
    from builder.arch.plan import ModelPlan
    from builder.io.checkpoint import HFCheckpoint
    from builder.quantize.amax import AmaxTable
    from builder.quantize.formats import Recipe
    from builder.quantize.rounding import RoundingStore


@dataclass(frozen=True)
class ExportJob:
    src: Path
    stage: Path  # the quantize run's staging directory; each format writes STAGE/<name>
    plan: ModelPlan
    ckpt: HFCheckpoint
    table: AmaxTable
    fields: dict[str, Any]  # calibration fields every export's manifest carries
    tp: int
    pp: int
    dtype: str
    workers: int
    say: Callable[[str], None]
    recipe: Recipe  # each linear's format (builder.quantize.formats)
    rounding: RoundingStore | None = None  # --rounding gptq: the codes both exports write


MAX_WORKERS = 8  # the H200 host's 12 GB export ran 2.8x faster with 8 than 1; disks saturate
WORKER_MEMORY = 2 << 30  # per worker: a TensorRT-LLM rank process can hold a whole rank
# tensor off the streamed path (at TP8 Ultra's fused FFN slice is 1.7 GB in BF16); an HF
# export thread holds at most 2 blocks of 64 MiB source and 32 MiB output


def default_workers() -> int:
    """`--workers auto`: one per usable CPU, at most MAX_WORKERS and at most one per
    WORKER_MEMORY of available memory (at least 1). The TensorRT-LLM export uses at most one
    per rank."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(cpus or 1, MAX_WORKERS, available_memory() // WORKER_MEMORY))


def available_memory() -> int:
    """MemAvailable from /proc/meminfo (bytes); without it, as if there were enough."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return MAX_WORKERS * WORKER_MEMORY


Exporter = Callable[[ExportJob], None]
EXPORTERS: Registry[Exporter] = Registry("export format")


@EXPORTERS.register("trtllm")
def export_trtllm(job: ExportJob) -> None:
    """FP8 TensorRT-LLM checkpoint (tp x pp rank files) for trtllm-build; a mixed recipe
    adds quant_cfg.json."""
    from builder.quantize.export_trtllm import write_trtllm_recipe

    job.say(f"writing FP8 TensorRT-LLM checkpoint (tp={job.tp}, pp={job.pp})")
    out = job.stage / "trtllm"
    write_trtllm_recipe(
        job.src,
        out,
        job.table,
        job.recipe,
        job.plan,
        job.ckpt,
        job.tp,
        job.pp,
        job.dtype,
        min(job.workers, job.tp * job.pp),  # a worker process writes one rank at a time
        allow_pickle=job.ckpt.is_pickle,
        rounding=job.rounding,
    )
    add_to_manifest(out, job.fields)


@EXPORTERS.register("hf")
def export_hf(job: ExportJob) -> None:
    """Unified HF FP8 checkpoint (ModelOpt's format) for the PyTorch backend, vLLM, SGLang."""
    from builder.dtypes import torch_dtype
    from builder.quantize.export_hf import write_unified_hf

    job.say("writing unified HF FP8 checkpoint")
    hf_dir = job.stage / "hf"
    hf_dir.mkdir()
    dtype = torch_dtype(job.dtype)
    written = write_unified_hf(
        hf_dir,
        job.plan,
        job.ckpt,
        job.table,
        dtype,
        recipe=job.recipe,
        workers=job.workers,
        rounding=job.rounding,
    )
    write_hf_manifest(hf_dir, job.src, written, job.fields)


def add_to_manifest(directory: Path, fields: dict[str, Any]) -> None:
    from builder.io.manifest import read_manifest, write_manifest

    manifest = read_manifest(directory)
    manifest.update(fields)
    write_manifest(directory, manifest)


def write_hf_manifest(directory: Path, src: Path, written: list, fields: dict[str, Any]) -> None:
    from builder.io.manifest import MANIFEST, ArtifactKind, file_entry, provenance, write_manifest

    hashed = {w.path.name: w.digest for w in written}
    files = {
        p.name: file_entry(p, digest=hashed.get(p.name))
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != MANIFEST
    }
    manifest = {
        **provenance(ArtifactKind.HF_FP8_CHECKPOINT),
        "source": {"path": str(src.resolve())},
        **fields,
        "files": files,
    }
    write_manifest(directory, manifest)


def run_export(name: str, job: ExportJob, seconds: dict[str, float]) -> None:
    """Runs one registered exporter, timing it as seconds['export_<name>']."""
    started = time.perf_counter()
    EXPORTERS.get(name)(job)
    seconds[f"export_{name}"] = round(time.perf_counter() - started, 3)

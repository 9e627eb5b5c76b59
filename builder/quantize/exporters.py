"""The export formats of `builder quantize`, by name: each writes one FP8 checkpoint into the
staging directory from the calibrated amax table.

Importing this module is cheap (no torch): the CLI's `--format` choices are EXPORTERS' keys.
A new format is one decorated function here.
"""

from __future__ import annotations

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


Exporter = Callable[[ExportJob], None]
EXPORTERS: Registry[Exporter] = Registry("export format")


@EXPORTERS.register("trtllm")
def export_trtllm(job: ExportJob) -> None:
    """FP8 TensorRT-LLM checkpoint (tp x pp rank files) for trtllm-build; a mixed recipe
    adds quant_cfg.json."""
    from builder.quantize.export_trtllm import write_trtllm_recipe
    from builder.quantize.pipeline import add_to_manifest

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
        job.workers,
        allow_pickle=job.ckpt.is_pickle,
    )
    add_to_manifest(out, job.fields)


@EXPORTERS.register("hf")
def export_hf(job: ExportJob) -> None:
    """Unified HF FP8 checkpoint (ModelOpt's format) for the PyTorch backend, vLLM, SGLang."""
    from builder.dtypes import torch_dtype
    from builder.quantize.export_hf import write_unified_hf
    from builder.quantize.pipeline import write_hf_manifest

    job.say("writing unified HF FP8 checkpoint")
    hf_dir = job.stage / "hf"
    hf_dir.mkdir()
    dtype = torch_dtype(job.dtype)
    written = write_unified_hf(hf_dir, job.plan, job.ckpt, job.table, dtype, recipe=job.recipe)
    write_hf_manifest(hf_dir, job.src, written, job.fields)


def run_export(name: str, job: ExportJob, seconds: dict[str, float]) -> None:
    """Runs one registered exporter, timing it as seconds['export_<name>']."""
    started = time.perf_counter()
    EXPORTERS.get(name)(job)
    seconds[f"export_{name}"] = round(time.perf_counter() - started, 3)

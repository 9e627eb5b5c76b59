"""`quantize_checkpoint`: calibrate once (block by block), export FP8 as TensorRT-LLM and/or HF.

Output (all of it appears at once: written in `.OUT.partial/`, renamed when complete):

  OUT/manifest.json     calibration data hash, ModelOpt version, per-layer amax table,
                        timings, peak memory, and the digest of every file below
  OUT/amax.json         the amax table (exact values; both exports are functions of it)
  OUT/trtllm/           FP8 TensorRT-LLM checkpoint (config.json, rank{R}.safetensors,
                        manifest.json from convert plus the calibration fields)
  OUT/hf/               unified HF FP8 checkpoint (hf_quant_config.json, config.json with
                        quantization_config, model*.safetensors, tokenizer, manifest.json)

Calibration state for --resume lives in `.OUT.calib/` beside OUT until the run succeeds
(with --rounding gptq also each block's GPTQ codes, `.OUT.calib/rounding/`, which both
exports write).
"""

from __future__ import annotations

import resource
import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from builder.arch.plan import LayerPlan, ModelPlan, load_plan
from builder.arch.tensors import FP8_SCALE_SUFFIXES, check_parallelism
from builder.convert.workers import start_fork_server
from builder.dtypes import torch_dtypes
from builder.errors import UserError
from builder.io.atomic import atomic_dir, check_output_location, check_replaceable, lock_stage
from builder.io.checkpoint import HFCheckpoint
from builder.io.manifest import (
    MANIFEST,
    ArtifactKind,
    file_entry,
    provenance,
    read_manifest,
    write_manifest,
)
from builder.quantize import export_trtllm
from builder.quantize.amax import AmaxTable
from builder.quantize.blockwise import (
    ROUNDING_DIR,
    CalibOptions,
    CalibResult,
    ModelParts,
    calibrate_blockwise,
    dist_info,
)
from builder.quantize.calib import CalibrationSet, build_calibration_set, load_tokenizer
from builder.quantize.export_hf import modelopt_version
from builder.quantize.exporters import EXPORTERS, ExportJob, run_export
from builder.quantize.formats import AutoOptions, Recipe
from builder.quantize.gptq import GptqOptions, Rounding
from builder.quantize.rounding import RoundingPlan, RoundingStore

# --recipe auto's search (builder.verify.auto.auto_recipe: it scores recipes with verify's
# block stream, a layer above quantize, so the caller hands it in): (src, plan, amax table,
# calibration windows, options, dtype, device, say, rounding=stored GPTQ codes or None) ->
# (recipe, manifest record, Markdown).
RecipeSearch = Callable[..., tuple[Recipe, dict[str, Any], str]]

FORMATS = EXPORTERS.names()
KIND = ArtifactKind.FP8_QUANTIZATION
DTYPES = torch_dtypes()


class AlreadyQuantized(UserError):
    """A source checkpoint that already holds quantized weights."""


@dataclass
class QuantizeSummary:
    out: Path
    formats: list[str]
    source: Path
    model_bytes: int
    calibration: dict[str, Any]
    seconds: dict[str, float]
    peak_rss_bytes: int
    peak_gpu_bytes: int | None
    amax: dict[str, dict[str, float]]
    blocks: dict[str, int]
    paths: dict[str, str] = field(default_factory=dict)
    rank: int = 0  # under torchrun: this process's rank (only rank 0 writes outputs)
    recipe: dict[str, Any] | None = None  # each linear's format (builder.quantize.formats)
    auto: dict[str, Any] | None = None  # --recipe auto: sensitivity, choice, probes
    rounding: dict[str, Any] | None = None  # how the E4M3 codes were chosen (rounding_record)

    def to_json(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe,
            "rounding": self.rounding,
            "auto": self.auto,
            "out": str(self.out),
            "source": str(self.source),
            "formats": self.formats,
            "paths": self.paths,
            "model_bytes": self.model_bytes,
            "calibration": self.calibration,
            "seconds": self.seconds,
            "peak_rss_bytes": self.peak_rss_bytes,
            "peak_gpu_bytes": self.peak_gpu_bytes,
            "blocks": self.blocks,
            "amax": self.amax,
        }


# ---- input checks --------------------------------------------------------------------------------
def refuse_quantized(ckpt: HFCheckpoint, config: dict[str, Any]) -> None:
    """Calibrating FP8 weights again would quantize twice; refuse with the evidence."""
    root = ckpt.root
    if (root / "hf_quant_config.json").exists():
        raise AlreadyQuantized(f"{root}: already quantized (hf_quant_config.json is present)")
    qconfig = config.get("quantization_config")
    if qconfig:
        method = qconfig.get("quant_method", "?") if isinstance(qconfig, dict) else "?"
        raise AlreadyQuantized(
            f"{root / 'config.json'}: already quantized (quantization_config, {method})"
        )
    for info in ckpt.tensors.values():
        if info.dtype in (torch.float8_e4m3fn, torch.int8, torch.uint8) or info.name.endswith(
            FP8_SCALE_SUFFIXES
        ):
            raise AlreadyQuantized(
                f"{info.file}: already quantized (tensor {info.name!r} is {info.dtype})"
            )


def parse_formats(formats: str | Sequence[str]) -> list[str]:
    if isinstance(formats, str):
        formats = FORMATS if formats == "both" else [formats]
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise UserError(f"unknown export format(s) {bad}; choose {', '.join(FORMATS)} or both")
    return list(formats)


def state_dir_for(out: Path) -> Path:
    return out.with_name(f".{out.name}.calib")


# ---- memory --------------------------------------------------------------------------------------
def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_gpu_bytes(device: str) -> int | None:
    if device.startswith("cuda") and torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return None


# ---- distributed ---------------------------------------------------------------------------------
def init_distributed(device: str) -> str:
    """Join the torchrun group if launched by it; returns this rank's device."""
    from builder.runtime.distributed import join_group

    return join_group(device)  # NCCL on CUDA (NVLink multicast kept off), gloo on the CPU


# ---- the reference model's pieces ----------------------------------------------------------------
def reference_parts(src: Path) -> ModelParts:
    from builder.model import DeciLMConfig, DeciLMForCausalLM

    config = DeciLMConfig.from_pretrained(str(src))
    config._attn_implementation = "sdpa"
    return ModelParts(DeciLMForCausalLM, config)


# ---- the run -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QuantizeRequest:
    """Everything a quantization is asked to do; the CLI, scripts and the demo build one.

    Progress callbacks belong to the running process, not the request: they are keyword
    arguments of `quantize`. A new option is one field here (with its default).
    """

    src: Path
    out: Path
    tp: int = 1
    pp: int = 1
    kv_cache: bool = True
    calib: str = "builtin"  # builtin, wiki, chat or a .txt/.jsonl/.parquet file
    calib_size: int = 512
    calib_seq_len: int = 512
    formats: tuple[str, ...] = FORMATS  # export formats (EXPORTERS keys); "both" is all
    device: str = "cpu"
    dtype: str = "bfloat16"
    batch_size: int = 4
    seed: int = 0
    resume: bool = False
    save_every: int = 0
    overwrite: bool = False
    workers: int = 1
    allow_pickle: bool = False
    recipe: Recipe | None = None  # each linear's format (None: FP8 per-tensor everywhere)
    auto: AutoOptions | None = None  # --recipe auto: the search's options (recipe then chosen)
    rounding: str = "nearest"  # or gptq (builder.quantize.gptq): E4M3 codes chosen against H
    gptq: GptqOptions = GptqOptions()

    def __post_init__(self) -> None:
        choices = [r.value for r in Rounding]
        if self.rounding not in choices:
            raise UserError(f"--rounding {self.rounding!r}: choose {' or '.join(choices)}")
        object.__setattr__(self, "src", Path(self.src))
        object.__setattr__(self, "out", Path(self.out))
        object.__setattr__(self, "formats", tuple(parse_formats(self.formats)))
        if self.dtype not in DTYPES:
            raise UserError(f"--dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}")


def quantize(
    request: QuantizeRequest,
    *,
    progress: Callable[[str], None] | None = None,
    block_progress: Callable[[int, int, LayerPlan | None], None] | None = None,
    recipe_search: RecipeSearch | None = None,
) -> QuantizeSummary:
    """Calibrate `request.src` with ModelOpt (FP8 weights/activations, optional FP8 KV) and
    export.

    Returns paths, timings, peak memory and the per-layer amax table. Under torchrun every
    rank calibrates its share of the data; rank 0 writes the outputs.
    """
    started = time.perf_counter()
    src, out, device = request.src, request.out, request.device
    say = progress or (lambda message: None)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine")
    check_output_location(out, [src])
    check_output_location(state_dir_for(out), [src])
    device = init_distributed(device)
    rank, world = dist_info()
    ckpt, plan, _config = open_source(src, request.allow_pickle)
    check_parallelism(plan, request.tp, request.pp)
    if request.recipe is not None:  # before hours of calibration, not after
        request.recipe.validate(plan)
        pp = request.pp if "trtllm" in request.formats else 1
        request.recipe.trtllm_layer_config(plan, request.kv_cache, pp)
        if "trtllm" in request.formats:
            request.recipe.check_trtllm(plan)
    check_replaceable(out, request.overwrite)
    with ExitStack() as stack:
        if rank == 0:  # one run per OUT: it owns .OUT.partial and .OUT.calib
            stack.enter_context(lock_stage(out))
        return _quantize(
            request, ckpt, plan, rank, world, device, say, block_progress, started, recipe_search
        )


def quantize_checkpoint(
    src: str | Path,
    out: str | Path,
    *,
    progress: Callable[[str], None] | None = None,
    block_progress: Callable[[int, int, LayerPlan | None], None] | None = None,
    recipe_search: RecipeSearch | None = None,
    **options: Any,
) -> QuantizeSummary:
    """`quantize(QuantizeRequest(src, out, **options))` for scripts and tests; `options` are
    QuantizeRequest's fields (an unknown one is a TypeError)."""
    request = QuantizeRequest(Path(src), Path(out), **options)
    return quantize(
        request, progress=progress, block_progress=block_progress, recipe_search=recipe_search
    )


def _quantize(
    request: QuantizeRequest,
    ckpt: HFCheckpoint,
    plan: ModelPlan,
    rank: int,
    world: int,
    device: str,
    say: Callable[[str], None],
    block_progress: Callable[[int, int, LayerPlan | None], None] | None,
    started: float,
    recipe_search: RecipeSearch | None = None,
) -> QuantizeSummary:
    src, out, tp, pp, dtype = request.src, request.out, request.tp, request.pp, request.dtype
    kv_cache, calib, seed = request.kv_cache, request.calib, request.seed
    calib_size, calib_seq_len = request.calib_size, request.calib_seq_len
    formats, batch_size = list(request.formats), request.batch_size
    resume, save_every = request.resume, request.save_every
    overwrite, workers = request.overwrite, request.workers
    recipe, auto = request.recipe, request.auto

    say(f"calibration data: {calib}, {calib_size} x {calib_seq_len} tokens")
    data = build_calibration_set(calib, load_tokenizer(src), calib_size, calib_seq_len, seed)
    opts = CalibOptions(
        kv_cache=kv_cache,
        device=device,
        dtype=DTYPES[dtype],
        batch_size=batch_size,
        state_dir=state_dir_for(out),
        resume=resume,
        save_every=save_every,
        rounding=rounding_plan(request),
    )
    fingerprint = calibration_fingerprint(ckpt, data, opts)
    if rank == 0 and workers > 1 and "trtllm" in formats:
        # the export's workers come from a fork server that imports torch: start it now, so
        # it is ready when calibration ends (seconds of a small export otherwise)
        start_fork_server([export_trtllm.__name__])
    say(
        f"calibrating {plan.num_layers - len(plan.empty_layers)} of {plan.num_layers} blocks "
        f"({len(plan.empty_layers)} empty blocks skipped)"
        + ("" if opts.rounding is None else ", each rounded by GPTQ right after it")
    )
    result = calibrate_blockwise(
        ckpt, plan, reference_parts(src), data.windows, opts, fingerprint, block_progress
    )
    seconds = {"calibration": round(result.seconds, 3)}
    store = RoundingStore(opts.state_dir / ROUNDING_DIR) if opts.rounding is not None else None
    paths: dict[str, str] = {}
    # Only rank 0 exports; the others are done (no barrier: an export can outlast any
    # collective timeout).
    auto_record = None
    if rank == 0 and auto is not None:
        recipe, auto_record = choose_recipe(
            recipe_search, src, plan, result, data, auto, device, dtype, say, store
        )
        seconds["auto"] = auto_record["seconds"]
    if rank == 0:
        paths = export_all(
            src,
            out,
            plan,
            ckpt,
            result,
            data,
            formats,
            tp,
            pp,
            dtype,
            workers,
            overwrite,
            seconds,
            say,
            recipe=recipe,
            auto_record=auto_record,
            rounding=store,
            rounding_record=rounding_record(opts.rounding),
        )
        shutil.rmtree(opts.state_dir, ignore_errors=True)
    seconds["total"] = round(time.perf_counter() - started, 3)
    summary = QuantizeSummary(
        out=out,
        formats=formats,
        source=src,
        model_bytes=ckpt.total_bytes(),
        calibration=data.describe() | {"world_size": world, "device": device, "dtype": dtype},
        seconds=seconds,
        peak_rss_bytes=peak_rss_bytes(),
        peak_gpu_bytes=peak_gpu_bytes(device),
        amax=result.table.per_layer(),
        blocks=result.summary() | {"layers": plan.num_layers},
        paths=paths,
        rank=rank,
        recipe=(recipe or Recipe()).to_json(),
        auto=auto_record,
        rounding=rounding_record(opts.rounding),
    )
    if rank == 0:
        finish_manifest(out, summary)
    return summary


def choose_recipe(
    search: RecipeSearch | None,
    src: Path,
    plan: ModelPlan,
    result: CalibResult,
    data: CalibrationSet,
    auto: AutoOptions,
    device: str,
    dtype: str,
    say: Callable[[str], None],
    rounding: RoundingStore | None = None,
) -> tuple[Recipe, dict[str, Any]]:
    """--recipe auto: measure and choose (the record keeps the chosen table as Markdown);
    under GPTQ the sensitivity runs the stored codes, so the choice is GPTQ's."""
    if search is None:
        raise ValueError("a request with `auto` options needs quantize(..., recipe_search=...)")
    recipe, record, table_md = search(
        src, plan, result.table, data.windows, auto, DTYPES[dtype], device, say, rounding=rounding
    )
    record["table_markdown"] = table_md
    return recipe, record


def rounding_plan(request: QuantizeRequest) -> RoundingPlan | None:
    """What calibration must round by GPTQ: the fixed recipe's formats, or under --recipe auto
    every format the search may choose (None: nearest rounding)."""
    if request.rounding != Rounding.GPTQ.value:
        return None
    if request.auto is not None:
        return RoundingPlan(request.gptq, None, tuple(request.auto.formats))
    return RoundingPlan(request.gptq, request.recipe or Recipe())


def rounding_record(plan: RoundingPlan | None) -> dict[str, Any]:
    """The manifest's quantization.rounding."""
    if plan is None:
        return {"method": Rounding.NEAREST.value}
    return {
        "method": Rounding.GPTQ.value,
        **plan.options.to_json(),
        "hessian": "X^T X of the BF16 calibration activations entering each GEMM, "
        "block-diagonal in column chunks",
        "per_tensor_weight_scale": "shared by q/k/v and by gate/up in both exports",
    }


def open_source(
    src: Path, allow_pickle: bool = False
) -> tuple[HFCheckpoint, ModelPlan, dict[str, Any]]:
    from builder.arch.plan import read_config
    from builder.convert.sources import check_source

    ckpt = HFCheckpoint(src, allow_pickle=allow_pickle)
    plan = load_plan(src)  # first: the schema names a malformed config.json's field
    config = read_config(src)
    refuse_quantized(ckpt, config)
    check_source(ckpt, plan)
    return ckpt, plan, config


def calibration_fingerprint(
    ckpt: HFCheckpoint, data: CalibrationSet, opts: CalibOptions
) -> dict[str, Any]:
    """What must match for saved calibration state to be reused."""
    from builder.convert.sources import source_fingerprint

    return {
        "source": source_fingerprint(ckpt),
        "calibration_sha256": data.sha256,
        "kv_cache": opts.kv_cache,
        "dtype": str(opts.dtype),
        "batch_size": opts.batch_size,
        "modelopt": modelopt_version(),
        "rounding": rounding_record(opts.rounding)
        | ({"plan": opts.rounding.to_json()} if opts.rounding else {}),
    }


def export_all(
    src: Path,
    out: Path,
    plan: ModelPlan,
    ckpt: HFCheckpoint,
    result: CalibResult,
    data: CalibrationSet,
    formats: list[str],
    tp: int,
    pp: int,
    dtype: str,
    workers: int,
    overwrite: bool,
    seconds: dict[str, float],
    say: Callable[[str], None],
    recipe: Recipe | None = None,
    auto_record: dict[str, Any] | None = None,
    rounding: RoundingStore | None = None,
    rounding_record: dict[str, Any] | None = None,
) -> dict[str, str]:
    """Write both exports into one staging directory; OUT appears only when all are done.

    `rounding`: the stored GPTQ codes both exports write (None: each rounds to nearest)."""
    table = result.table
    recipe = recipe or Recipe()
    recipe.validate(plan)
    fields = calibration_fields(table, data, recipe)
    fields["quantization"]["rounding"] = rounding_record or {"method": Rounding.NEAREST.value}
    if auto_record is not None:
        fields["quantization"]["auto"] = auto_record
    paths = {}
    with atomic_dir(out, overwrite, inputs=[src]) as stage:
        table.save(stage / "amax.json")
        job = ExportJob(
            src, stage, plan, ckpt, table, fields, tp, pp, dtype, workers, say, recipe, rounding
        )
        for name in formats:
            run_export(name, job, seconds)
            paths[name] = str(out / name)
        write_manifest(stage, {**provenance(KIND), **fields, "files": files_of(stage)})
    return paths


def calibration_fields(
    table: AmaxTable, data: CalibrationSet, recipe: Recipe | None = None
) -> dict[str, Any]:
    recipe = recipe or Recipe()
    return {
        "quantization": {
            "algorithm": recipe.describe(),
            "recipe": recipe.to_json(),
            "kv_cache": "FP8" if table.kv_cache else None,
            "producer": {"name": "nvidia-modelopt", "version": modelopt_version()},
        },
        "calibration": data.describe(),
        "amax": table.per_layer(),
    }


def files_of(directory: Path) -> dict[str, Any]:
    """Top-level files hashed; each export's files are taken from its own manifest."""
    files: dict[str, Any] = {}
    for path in sorted(directory.rglob("*")):
        if not path.is_file() or path.name == MANIFEST and path.parent == directory:
            continue
        rel = str(path.relative_to(directory))
        sub = path.parent.name if path.parent != directory else None
        if sub and path.name != MANIFEST:
            files[rel] = read_manifest(path.parent)["files"][path.name]
        else:
            files[rel] = file_entry(path)
    return files


def finish_manifest(out: Path, summary: QuantizeSummary) -> None:
    """Add the run's timings and memory to OUT/manifest.json (written after the rename)."""
    manifest = read_manifest(out)
    manifest["run"] = {
        "seconds": summary.seconds,
        "peak_rss_bytes": summary.peak_rss_bytes,
        "peak_gpu_bytes": summary.peak_gpu_bytes,
        "model_bytes": summary.model_bytes,
        "blocks": summary.blocks,
        "calibration": summary.calibration,
    }
    write_manifest(out, manifest)

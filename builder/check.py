"""`builder check`: every artifact builder writes, verified against its manifest and the plan.

The manifest's `kind` decides what is checked:
- `hf-checkpoint` (synth, import-smollm2): digest of every file, nothing unlisted; config.json
  parses to a plan; the index and shard headers hold exactly the plan's tensor names and
  shapes, all in the config's dtype;
- `hf-fp8-checkpoint` (quantize's unified HF export): the same, with FP8 E4M3 weights, a
  `weight_scale` and `input_scale` for every decoder linear and `k_scale`/`v_scale` for every
  attention layer when the KV cache is FP8; hf_quant_config.json, config.json's
  `quantization_config` and the manifest agree; every scale finite and positive;
- `trtllm-checkpoint` (convert, quantize's TensorRT-LLM export, BF16 or FP8): builder.convert.check;
- `fp8-quantization` (quantize's OUT): its own manifest, amax.json, then trtllm/ and hf/;
- anything else builder writes (build outputs): the manifest (files, sizes, digests).
With hashes on (the default) every floating tensor is also scanned for NaN/Inf, streamed
tensor by tensor in row blocks, and a non-finite value is a failure naming the tensor.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from builder.arch import load_plan
from builder.arch.formats import LinearFormat, Recipe, recipe_from_hf_quantization
from builder.arch.plan import ModelPlan
from builder.arch.tensors import (
    HF_SCALE_SUFFIXES,
    ROLES,
    hf_channel_scale_name,
    hf_kv_scale_name,
    hf_scale_names,
    hf_tensor_shapes,
    optional_hf_shapes,
    parse_hf_name,
)
from builder.convert.check import (
    CheckReport,
    Reporter,
    check_checkpoint,
    manifest_files,
    scan_files,
)
from builder.convert.pipeline import DRY_RUN_KIND as CONVERT_DRY_RUN_KIND
from builder.convert.pipeline import KIND as TRTLLM_KIND
from builder.errors import UserError
from builder.io.checkpoint import HFCheckpoint
from builder.io.manifest import MANIFEST, ArtifactKind, read_manifest

HF_KIND = ArtifactKind.HF_CHECKPOINT
HF_FP8_KIND = ArtifactKind.HF_FP8_CHECKPOINT
QUANTIZE_KIND = ArtifactKind.FP8_QUANTIZATION
HF_QUANT_CONFIG = "hf_quant_config.json"
FP8_DTYPE = "float8_e4m3fn"
SCALE_SUFFIXES = HF_SCALE_SUFFIXES


def check_artifact(
    directory: str | Path,
    source: str | Path | None = None,
    hashes: bool = True,
    progress: Reporter | None = None,
) -> CheckReport:
    """Check DIRECTORY by the kind its manifest names (a staging dir: which ranks are done)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{directory}: not a directory")
    if not (directory / MANIFEST).exists():
        return check_checkpoint(directory, source=source, hashes=hashes, progress=progress)
    kind = read_manifest(directory).get("kind")
    if kind in (TRTLLM_KIND, CONVERT_DRY_RUN_KIND) or source is not None:
        return check_checkpoint(directory, source=source, hashes=hashes, progress=progress)
    checker = CHECKERS.get(kind, check_manifest_only)
    return checker(directory, hashes, progress)


def check_manifest_only(directory: Path, hashes: bool, progress: Reporter | None) -> CheckReport:
    manifest = read_manifest(directory)
    report = CheckReport(str(directory), str(manifest.get("kind", "?")), hashes_checked=hashes)
    manifest_files(directory, manifest, report, hashes, progress, nested=True)
    return report


# ---- HF checkpoints (BF16/FP32 and the FP8 export) --------------------------------------------
def _torch_dtype_name(config: dict[str, Any]) -> str:
    name = config.get("torch_dtype") or config.get("dtype") or "bfloat16"
    return str(name).removeprefix("torch.")


def _open_hf(directory: Path, report: CheckReport) -> tuple[ModelPlan, HFCheckpoint, dict] | None:
    try:
        config = json.loads((directory / "config.json").read_text())
        plan = load_plan(directory)
        ckpt = HFCheckpoint(directory)
    except (OSError, ValueError) as err:
        report.problem(f"{directory / 'config.json'}: unreadable ({err})")
        return None
    except UserError as err:
        report.problem(str(err))
        return None
    report.dtype = _torch_dtype_name(config)
    return plan, ckpt, config


def _compare(
    directory: Path, ckpt: HFCheckpoint, expected: dict[str, tuple[tuple, str]], report: CheckReport
) -> None:
    """Exactly the expected tensors, each with its shape and dtype."""
    for name, (shape, dtype) in expected.items():
        if name not in ckpt:
            report.problem(f"{directory}: tensor {name!r} is missing")
            continue
        info = ckpt.info(name)
        found = str(info.dtype).removeprefix("torch.")
        if tuple(info.shape) != tuple(shape) or found != dtype:
            report.problem(
                f"{info.file}: tensor {name!r} is {list(info.shape)} {found}, "
                f"the plan says {list(shape)} {dtype}"
            )
    for name in ckpt.names():
        if name not in expected:
            report.problem(f"{ckpt.info(name).file}: tensor {name!r} is not expected by the plan")
    report.tensors = len(ckpt.names())


def _scan(report: CheckReport, ckpt: HFCheckpoint, progress: Reporter | None) -> None:
    scales: dict[Path, list[str]] = {}
    for name in ckpt.names():
        if name.endswith(SCALE_SUFFIXES):
            scales.setdefault(ckpt.info(name).file, []).append(name)
    scan_files(report, ckpt.files(), sorted(scales.items()), progress)


def check_hf(directory: Path, hashes: bool, progress: Reporter | None) -> CheckReport:
    manifest = read_manifest(directory)
    report = CheckReport(str(directory), HF_KIND, hashes_checked=hashes, fp8=False)
    manifest_files(directory, manifest, report, hashes, progress)
    opened = _open_hf(directory, report)
    if opened is None:
        return report
    plan, ckpt, _config = opened
    report.kv_cache = report.dtype
    expected = {name: (shape, report.dtype) for name, shape in hf_tensor_shapes(plan).items()}
    for name, shape in optional_hf_shapes(plan).items():
        if name in ckpt:  # a tied lm_head's copy
            expected[name] = (shape, report.dtype)
    _compare(directory, ckpt, expected, report)
    if hashes and report.ok:
        _scan(report, ckpt, progress)
    return report


def hf_fp8_expected(
    plan: ModelPlan, dtype: str, kv_cache: bool, recipe: Recipe | None = None
) -> dict[str, tuple[tuple, str]]:
    """Names, shapes and dtypes of the unified HF FP8 export of `plan` (`recipe`: the format
    of each linear, builder.arch.formats; default per-tensor FP8)."""
    formats = (recipe or Recipe()).by_hf_module(plan)
    attention = {layer.index for layer in plan.layers if layer.has_kv_cache}
    expected: dict[str, tuple[tuple, str]] = {}
    for name, shape in hf_tensor_shapes(plan).items():
        module = name.removesuffix(".weight")
        if module not in formats:
            expected[name] = (shape, dtype)
            continue
        fmt = formats[module]
        if fmt is LinearFormat.BF16:
            expected[name] = (shape, dtype)
        elif fmt.per_channel:
            expected[name] = (shape, FP8_DTYPE if fmt.fp8 else "int8")
            expected[hf_channel_scale_name(module)] = ((shape[0],), "float32")
        else:
            expected[name] = (shape, FP8_DTYPE)
            for scale in hf_scale_names(module):
                expected[scale] = ((), "float32")
        tensor = parse_hf_name(name)
        if kv_cache and ROLES[tensor.role].cache and tensor.layer in attention:
            expected[hf_kv_scale_name(tensor.role, tensor.layer)] = ((), "float32")
    return expected


def _quant_declarations(
    directory: Path, manifest: dict, config: dict, report: CheckReport
) -> bool | None:
    """hf_quant_config.json, config.json and the manifest must tell one story; returns whether
    the KV cache is FP8 (None when unreadable)."""
    path = directory / HF_QUANT_CONFIG
    try:
        declared = json.loads(path.read_text())["quantization"]
        algo, kv_algo = declared["quant_algo"], declared.get("kv_cache_quant_algo")
    except (OSError, ValueError, KeyError, TypeError) as err:
        report.problem(f"{path}: missing or unreadable ({err})")
        return None
    if algo not in HF_ALGOS:
        expected = ", ".join(repr(a) for a in HF_ALGOS)
        report.problem(f"{path}: quant_algo is {algo!r}, expected one of {expected}")
    kv = kv_algo == "FP8"
    qconfig = config.get("quantization_config")
    if not isinstance(qconfig, dict):
        report.problem(f"{directory / 'config.json'}: no quantization_config")
    else:
        if qconfig.get("quant_algo") != algo:
            report.problem(
                f"{directory / 'config.json'}: quantization_config.quant_algo is "
                f"{qconfig.get('quant_algo')!r} but {HF_QUANT_CONFIG} says {algo!r}"
            )
        if bool(qconfig.get("kv_cache_scheme")) != kv:
            report.problem(
                f"{directory / 'config.json'}: quantization_config.kv_cache_scheme "
                f"disagrees with {HF_QUANT_CONFIG}'s kv_cache_quant_algo {kv_algo!r}"
            )
    recorded = (manifest.get("quantization") or {}).get("kv_cache")
    if "quantization" in manifest and (recorded == "FP8") != kv:
        report.problem(
            f"{directory / MANIFEST}: quantization.kv_cache is {recorded!r} but "
            f"{HF_QUANT_CONFIG} says {kv_algo!r}"
        )
    return kv


HF_ALGOS = ("FP8", "FP8_PER_CHANNEL_PER_TOKEN", "W8A16", "MIXED_PRECISION")


def _declared_recipe(directory: Path, plan: ModelPlan, report: CheckReport) -> Recipe | None:
    """The per-linear formats hf_quant_config.json declares (None, with a problem, if bad)."""
    path = directory / HF_QUANT_CONFIG
    try:
        quantization = json.loads(path.read_text())["quantization"]
        return recipe_from_hf_quantization(plan, quantization, str(path))
    except UserError as err:
        report.problem(str(err))
    except (OSError, ValueError, KeyError, TypeError) as err:
        report.problem(f"{path}: unreadable ({err})")
    return None


def check_hf_fp8(directory: Path, hashes: bool, progress: Reporter | None) -> CheckReport:
    manifest = read_manifest(directory)
    report = CheckReport(str(directory), HF_FP8_KIND, hashes_checked=hashes, fp8=True)
    manifest_files(directory, manifest, report, hashes, progress)
    opened = _open_hf(directory, report)
    if opened is None:
        return report
    plan, ckpt, config = opened
    kv = _quant_declarations(directory, manifest, config, report)
    if kv is None:
        return report
    report.kv_cache = "fp8" if kv else report.dtype
    recipe = _declared_recipe(directory, plan, report)
    if recipe is None:
        return report
    _compare(directory, ckpt, hf_fp8_expected(plan, report.dtype, kv, recipe), report)
    if hashes and report.ok:
        _scan(report, ckpt, progress)
    return report


# ---- quantize's OUT ---------------------------------------------------------------------------
def check_quantize_root(directory: Path, hashes: bool, progress: Reporter | None) -> CheckReport:
    manifest = read_manifest(directory)
    report = CheckReport(str(directory), QUANTIZE_KIND, hashes_checked=hashes, fp8=True)
    manifest_files(directory, manifest, report, hashes, progress, nested=True)
    amax = directory / "amax.json"
    try:
        json.loads(amax.read_text())
    except (OSError, ValueError) as err:
        report.problem(f"{amax}: missing or unreadable ({err})")
    subdirs = [name for name in ("trtllm", "hf") if (directory / name).is_dir()]
    if not subdirs:
        report.problem(f"{directory}: holds neither trtllm/ nor hf/")
    for name in subdirs:
        report.add_part(check_artifact(directory / name, hashes=hashes, progress=progress))
    kv = (manifest.get("quantization") or {}).get("kv_cache")
    report.kv_cache = "fp8" if kv == "FP8" else next((p.kv_cache for p in report.parts), None)
    report.dtype = next((p.dtype for p in report.parts), None)
    report.tensors = sum(p.tensors for p in report.parts)
    report.finite_checked = bool(report.parts) and all(p.finite_checked for p in report.parts)
    report.scales_checked = sum(p.scales_checked for p in report.parts)
    return report


CHECKERS = {HF_KIND: check_hf, HF_FP8_KIND: check_hf_fp8, QUANTIZE_KIND: check_quantize_root}


# ---- the one-line summary -----------------------------------------------------------------------
def describe(report: CheckReport) -> str:
    """What was checked, e.g. 'trtllm-checkpoint tp=2 pp=1, bfloat16, FP8 no, KV cache bfloat16,
    3 files (digests), 1,325 tensors, all finite'."""
    parts = [report.kind]
    if report.tp is not None:
        parts[0] += f" tp={report.tp} pp={report.pp}"
    if report.dtype:
        parts.append(str(report.dtype))
    if report.fp8 is not None:
        parts.append(f"FP8 {'yes' if report.fp8 else 'no'}")
    if report.kv_cache:
        parts.append(f"KV cache {report.kv_cache}")
    parts.append(f"{report.files} files ({'digests' if report.hashes_checked else 'sizes'})")
    if report.tensors:
        parts.append(f"{report.tensors:,} tensors")
    if report.finite_checked:
        parts.append(
            "all finite"
            + (f", {report.scales_checked:,} scales > 0" if report.scales_checked else "")
        )
    text = ", ".join(parts)
    if report.parts:
        text += "; " + "; ".join(f"{Path(p.directory).name}/: {describe(p)}" for p in report.parts)
    return text

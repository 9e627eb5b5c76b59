"""`builder check`: a TensorRT-LLM checkpoint against its manifest and against the plan.

Checks, each problem naming the file, rank or tensor:
- manifest.json: kind, completeness; every listed file present with its size and digest
  (blake3, or sha256 in older manifests; skipped with `hashes=False`); no unlisted rank files;
- config.json: parses to a plan; its mapping matches the manifest's layout;
- every rank file's safetensors header: exactly the tensor names, shapes and dtypes the plan
  implies for that rank (FP8 layout when `quantization` says so), data covering the file;
- with `source`: the HF checkpoint's fingerprint equals the one recorded at conversion.
A staging directory (`.OUT.partial`) is reported as partial: which ranks are done.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from builder.arch.plan import ModelPlan
from builder.arch.tensors import TRTLLM_SCALE_SUFFIXES, check_parallelism
from builder.convert.layout import layout_for, output_dtype, rank_layout, recipe_layout_for
from builder.convert.pipeline import DRY_RUN_KIND, ENTRIES, KIND, entry_verifies, read_entry
from builder.convert.sources import source_fingerprint
from builder.errors import UserError
from builder.io.checkpoint import HFCheckpoint
from builder.io.manifest import MANIFEST, digest_problem, read_manifest
from builder.io.safetensors_stream import header_specs, read_header
from builder.io.trtllm_checkpoint import mapping_of, rank_file_name, read_trtllm_config


@dataclass
class CheckReport:
    directory: str
    kind: str
    ok: bool = True
    partial: bool = False
    tp: int | None = None
    pp: int | None = None
    dtype: str | None = None
    hashes_checked: bool = False
    fp8: bool | None = None
    kv_cache: str | None = None
    files: int = 0
    tensors: int = 0
    finite_checked: bool = False
    scales_checked: int = 0
    ranks: list[dict[str, Any]] = field(default_factory=list)
    parts: list[CheckReport] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def problem(self, text: str) -> None:
        self.ok = False
        self.problems.append(text)

    def add_part(self, part: CheckReport) -> None:
        self.parts.append(part)
        for text in part.problems:
            self.problem(text)

    def to_json(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data["parts"] = [part.to_json() for part in self.parts]
        return data


Reporter = Any  # builder.progress.Reporter (kept loose: the check runs without one)


def scan_files(
    report: CheckReport,
    files: list[Path],
    fp8_scales: list[tuple[Path, list[str]]],
    progress: Reporter | None = None,
) -> None:
    """NaN/Inf in any tensor of `files` (streamed), and every FP8 scale finite and positive."""
    from builder.io.finite import nonfinite_tensors, scale_problems

    total = sum(p.stat().st_size for p in files)
    if progress:
        progress.start("finite scan", total, "bytes")
    for path in files:
        bad = nonfinite_tensors(
            path,
            on_tensor=(lambda _n, size: progress.advance("finite scan", size))
            if progress
            else None,
        )
        for name, count in bad.items():
            report.problem(f"{path}: tensor {name!r} holds {count:,} non-finite value(s) (NaN/Inf)")
    if progress:
        progress.finish("finite scan")
    for path, names in fp8_scales:
        report.scales_checked += len(names)
        for text in scale_problems(path, names):
            report.problem(text)
    report.finite_checked = True


def manifest_files(
    directory: Path,
    manifest: dict,
    report: CheckReport,
    hashes: bool,
    progress: Reporter | None = None,
    nested: bool = False,
) -> None:
    """Every file the manifest lists is present with its size (and digest); nothing unlisted.
    `nested`: the listing covers subdirectories too (each with its own manifest)."""
    files = manifest.get("files", {})
    report.files = len(files)
    total = sum(int(e.get("size", 0)) for e in files.values())
    if progress and hashes:
        progress.start("digests", total, "bytes")
    for name, entry in files.items():
        path = directory / name
        if not path.is_file():
            report.problem(f"{path}: listed in the manifest but missing")
        elif path.stat().st_size != entry["size"]:
            report.problem(f"{path}: size {path.stat().st_size:,} != manifest {entry['size']:,}")
        elif hashes and (problem := digest_problem(path, entry)):
            report.problem(f"{problem} (file changed or corrupt)")
        if progress and hashes:
            progress.advance("digests", int(entry.get("size", 0)))
    if progress and hashes:
        progress.finish("digests")
    present = sorted(directory.rglob("*")) if nested else sorted(directory.iterdir())
    for path in present:
        rel = str(path.relative_to(directory))
        if path.is_file() and rel != MANIFEST and rel not in files:
            report.problem(f"{path}: not listed in the manifest")


def check_checkpoint(
    directory: str | Path,
    source: str | Path | None = None,
    hashes: bool = True,
    progress: Reporter | None = None,
) -> CheckReport:
    """A TensorRT-LLM checkpoint (BF16 or FP8); with `hashes` also every value finite."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{directory}: not a directory")
    if not (directory / MANIFEST).exists() and (directory / ENTRIES).is_dir():
        return _check_stage(directory, hashes)
    manifest = read_manifest(directory)
    report = CheckReport(str(directory), manifest.get("kind", "?"), hashes_checked=hashes)
    if report.kind == DRY_RUN_KIND:
        report.problem(
            f"{directory / MANIFEST}: a --dry-run manifest: it describes rank files but none were "
            "written"
        )
        return report
    if report.kind != KIND:
        report.problem(f"{directory / MANIFEST}: kind {report.kind!r} is not {KIND!r}")
        return report
    manifest_files(directory, manifest, report, hashes, progress)
    plan = _check_config(directory, manifest, report)
    if plan is not None:
        scales = _check_headers(directory, plan, manifest, report)
        if hashes and report.ok:
            scan_files(
                report,
                [directory / rank_file_name(r) for r in range(report.tp * report.pp)],
                scales,
                progress,
            )
    if source is not None:
        _check_source(Path(source), manifest, report)
    return report


def _check_config(directory: Path, manifest: dict, report: CheckReport) -> ModelPlan | None:
    try:
        config, plan = read_trtllm_config(directory)
        tp, pp = mapping_of(config)
        check_parallelism(plan, tp, pp)
    except UserError as err:
        report.problem(str(err))
        return None
    report.tp, report.pp, report.dtype = tp, pp, config.get("dtype")
    quant = config.get("quantization") or {}
    report.fp8 = quant.get("quant_algo") == "FP8"
    report.kv_cache = "fp8" if quant.get("kv_cache_quant_algo") == "FP8" else report.dtype
    layout = manifest.get("layout", {})
    if (layout.get("tp"), layout.get("pp"), layout.get("dtype")) != (tp, pp, config.get("dtype")):
        report.problem(
            f"{directory / 'config.json'}: tp={tp} pp={pp} dtype={config.get('dtype')} but the "
            "manifest "
            f"says tp={layout.get('tp')} pp={layout.get('pp')} dtype={layout.get('dtype')}"
        )
    if config.get("quantization") != layout.get("quantization"):
        report.problem(f"{directory / 'config.json'}: quantization differs from the manifest's")
    return plan


def _check_headers(directory: Path, plan: ModelPlan, manifest: dict, report: CheckReport) -> list:
    """Header problems per rank; returns the FP8 scale tensors of each rank file."""
    config = json.loads((directory / "config.json").read_text())
    tp, pp = report.tp, report.pp
    dtype = output_dtype(config.get("dtype", "bfloat16"))
    transform = recipe_layout_for(directory, config) or layout_for(config.get("quantization"))
    scales = []
    for rank in range(tp * pp):
        path = directory / rank_file_name(rank)
        row = {"rank": rank, "file": path.name, "tensors": 0, "bytes": 0, "ok": True}
        report.ranks.append(row)
        if not path.is_file():
            row["ok"] = False
            report.problem(f"{path}: missing (world size {tp * pp})")
            continue
        expected = {s.name: s for s in rank_layout(plan, tp, pp, rank, dtype, transform).flat_specs}
        problems = _header_problems(path, expected)
        row.update(tensors=len(expected), bytes=path.stat().st_size, ok=not problems)
        report.tensors += len(expected)
        scales.append((path, [name for name in expected if name.endswith(TRTLLM_SCALE_SUFFIXES)]))
        for text in problems:
            report.problem(text)
    return scales


def _header_problems(path: Path, expected: dict) -> list[str]:
    try:
        start, header = read_header(path)
        specs = header_specs(header)
    except UserError as err:
        return [str(err)]
    found = {s.name: s for s in specs}
    problems = [f"{path}: tensor {name!r} is missing" for name in expected if name not in found]
    problems += [
        f"{path}: tensor {name!r} is not expected by the plan"
        for name in found
        if name not in expected
    ]
    for name, spec in found.items():
        want = expected.get(name)
        if want is not None and (want.shape, want.dtype) != (spec.shape, spec.dtype):
            problems.append(
                f"{path}: tensor {name!r} is {list(spec.shape)} {spec.code}, "
                f"the plan says {list(want.shape)} {want.code}"
            )
    end = max((e["data_offsets"][1] for k, e in header.items() if k != "__metadata__"), default=0)
    if start + end != path.stat().st_size:
        problems.append(
            f"{path}: header describes {start + end:,} bytes but the file has "
            f"{path.stat().st_size:,}"
        )
    return problems


def _check_source(source: Path, manifest: dict, report: CheckReport) -> None:
    recorded = (manifest.get("source") or {}).get("fingerprint")
    actual = source_fingerprint(HFCheckpoint(source))
    if recorded != actual:
        report.problem(
            f"{source}: fingerprint {actual[:12]} differs from the one recorded at conversion "
            f"({str(recorded)[:12]})"
        )


def _check_stage(stage: Path, hashes: bool) -> CheckReport:
    """Progress of an unfinished (or multi-host) conversion in a staging directory."""
    report = CheckReport(str(stage), "staging", ok=False, partial=True, hashes_checked=hashes)
    try:
        config, _ = read_trtllm_config(stage)
        report.tp, report.pp = mapping_of(config)
        report.dtype = config.get("dtype")
    except UserError as err:
        report.problem(str(err))
        return report
    missing = []
    for rank in range(report.tp * report.pp):
        entry = read_entry(stage, rank)
        path = stage / rank_file_name(rank)
        done = bool(entry) and path.is_file() and path.stat().st_size == entry["size"]
        if done and hashes:
            done = entry_verifies(stage, entry)
        report.ranks.append({"rank": rank, "file": path.name, "ok": done})
        if not done:
            missing.append(rank)
    report.problems.append(
        f"{stage}: unfinished conversion: {report.tp * report.pp - len(missing)} of "
        f"{report.tp * report.pp} ranks done; missing {missing}"
    )
    return report

"""`builder check`: a TensorRT-LLM checkpoint against its manifest and against the plan.

Checks, each problem naming the file, rank or tensor:
- manifest.json: kind, completeness; every listed file present with its size and sha256
  (sha256 skipped with `hashes=False`); no unlisted rank files;
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
from builder.arch.tensors import check_parallelism
from builder.convert.layout import layout_for, rank_layout, torch_dtype
from builder.convert.pipeline import DRY_RUN_KIND, ENTRIES, KIND, entry_verifies, read_entry
from builder.convert.rank_writer import rank_file_name
from builder.convert.sources import source_fingerprint
from builder.convert.trtllm_config import mapping_of, read_trtllm_config
from builder.errors import UserError
from builder.io.checkpoint import HFCheckpoint
from builder.io.manifest import MANIFEST, read_manifest, sha256_file
from builder.io.safetensors_stream import DTYPE_CODES, header_specs, read_header


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
    ranks: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def problem(self, text: str) -> None:
        self.ok = False
        self.problems.append(text)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def check_checkpoint(directory: str | Path, source: str | Path | None = None, hashes: bool = True) -> CheckReport:
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{directory}: not a directory")
    if not (directory / MANIFEST).exists() and (directory / ENTRIES).is_dir():
        return _check_stage(directory, hashes)
    manifest = read_manifest(directory)
    report = CheckReport(str(directory), manifest.get("kind", "?"), hashes_checked=hashes)
    if report.kind == DRY_RUN_KIND:
        report.problem(f"{directory / MANIFEST}: a --dry-run manifest: it describes rank files but none were written")
        return report
    if report.kind != KIND:
        report.problem(f"{directory / MANIFEST}: kind {report.kind!r} is not {KIND!r}")
        return report
    _check_files(directory, manifest, report, hashes)
    plan = _check_config(directory, manifest, report)
    if plan is not None:
        _check_headers(directory, plan, manifest, report)
    if source is not None:
        _check_source(Path(source), manifest, report)
    return report


def _check_files(directory: Path, manifest: dict, report: CheckReport, hashes: bool) -> None:
    files = manifest.get("files", {})
    for name, entry in files.items():
        path = directory / name
        if not path.is_file():
            report.problem(f"{path}: listed in the manifest but missing")
        elif path.stat().st_size != entry["size"]:
            report.problem(f"{path}: size {path.stat().st_size:,} != manifest {entry['size']:,}")
        elif hashes and sha256_file(path) != entry["sha256"]:
            report.problem(f"{path}: sha256 differs from the manifest (file changed or corrupt)")
    for path in sorted(directory.iterdir()):
        if path.name != MANIFEST and path.name not in files:
            report.problem(f"{path}: not listed in the manifest")


def _check_config(directory: Path, manifest: dict, report: CheckReport) -> ModelPlan | None:
    try:
        config, plan = read_trtllm_config(directory)
        tp, pp = mapping_of(config)
        check_parallelism(plan, tp, pp)
    except UserError as err:
        report.problem(str(err))
        return None
    report.tp, report.pp, report.dtype = tp, pp, config.get("dtype")
    layout = manifest.get("layout", {})
    if (layout.get("tp"), layout.get("pp"), layout.get("dtype")) != (tp, pp, config.get("dtype")):
        report.problem(
            f"{directory / 'config.json'}: tp={tp} pp={pp} dtype={config.get('dtype')} but the manifest "
            f"says tp={layout.get('tp')} pp={layout.get('pp')} dtype={layout.get('dtype')}"
        )
    if config.get("quantization") != layout.get("quantization"):
        report.problem(f"{directory / 'config.json'}: quantization differs from the manifest's")
    return plan


def _check_headers(directory: Path, plan: ModelPlan, manifest: dict, report: CheckReport) -> None:
    config = json.loads((directory / "config.json").read_text())
    tp, pp = report.tp, report.pp
    dtype = torch_dtype(config.get("dtype", "bfloat16"))
    transform = layout_for(config.get("quantization"))
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
        for text in problems:
            report.problem(text)


def _header_problems(path: Path, expected: dict) -> list[str]:
    try:
        start, header = read_header(path)
        specs = header_specs(header)
    except UserError as err:
        return [str(err)]
    found = {s.name: s for s in specs}
    problems = [f"{path}: tensor {name!r} is missing" for name in expected if name not in found]
    problems += [f"{path}: tensor {name!r} is not expected by the plan" for name in found if name not in expected]
    for name, spec in found.items():
        want = expected.get(name)
        if want is not None and (want.shape, want.dtype) != (spec.shape, spec.dtype):
            problems.append(
                f"{path}: tensor {name!r} is {list(spec.shape)} {DTYPE_CODES.get(spec.dtype)}, "
                f"the plan says {list(want.shape)} {DTYPE_CODES.get(want.dtype)}"
            )
    end = max((e["data_offsets"][1] for k, e in header.items() if k != "__metadata__"), default=0)
    if start + end != path.stat().st_size:
        problems.append(f"{path}: header describes {start + end:,} bytes but the file has {path.stat().st_size:,}")
    return problems


def _check_source(source: Path, manifest: dict, report: CheckReport) -> None:
    recorded = (manifest.get("source") or {}).get("fingerprint")
    actual = source_fingerprint(HFCheckpoint(source))
    if recorded != actual:
        report.problem(f"{source}: fingerprint {actual[:12]} differs from the one recorded at conversion ({str(recorded)[:12]})")


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

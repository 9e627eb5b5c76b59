"""Fault localization: every part of the artifact run alone on the golden's own inputs.

The golden stores the BF16 reference's hidden states entering every non-empty block for a
short probe (builder.verify.golden). Each part of the artifact is run on exactly those
inputs, one at a time, and compared with what the reference produced from them:

  embedding   ||a - g|| / ||g|| of the probe's embeddings;
  block i     ||a - g|| / ||g - x||: the error of the block's output relative to the block's
              own update (x: its golden input; the residual stream itself cancels), so a
              block's score does not depend on the blocks before it;
  lm_head     ||a - g|| / ||g|| of the logits from the golden's final hidden states.

Parts are ranked by that error. A part is "out of line" when its error exceeds OUTLIER_RATIO
times the median block error and ABSOLUTE_FLOOR (both derived in docs/verify.md). For the
worst parts the report then names tensors: for FP8, every weights/activation/KV scaling factor
that is not what the calibrated amax table (in the artifact's manifest) implies under the
exporter's rules, and, when the golden's source checkpoint is still at its recorded path with
the same fingerprint, every weight whose dequantized values are further from the source than
quantization can explain. `manifest_findings` re-hashes the artifact's files against its
manifest and recognises swapped files.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from builder.arch.plan import LayerPlan, ModelPlan
from builder.arch.tensors import (
    ROLES,
    WEIGHT,
    Role,
    cache_roles,
    hf_kv_scale_name,
    hf_layer_prefix,
    hf_module,
    hf_scale_names,
    hf_weight,
)
from builder.verify.golden import Golden, block_kind

OUTLIER_RATIO = 4.0
ABSOLUTE_FLOOR = 0.05
# Relative distance of a dequantized weight from its source that quantization alone cannot
# produce: E4M3 has 3 mantissa bits, so |rounding error| <= 2^-4 = 6.25% of each value (RMS
# ~2-3%); BF16 from an fp32 source: <= 2^-8 = 0.4%.
FP8_WEIGHT_LIMIT = 0.0625
BF16_WEIGHT_LIMIT = 0.004
SCALE_RTOL = 1e-5
LM_HEAD_PART = hf_module(Role.LM_HEAD)  # the part after the last block is named for its tensor
WORST_DETAILED = 3


class Localizer(Protocol):
    plan: ModelPlan

    def embed(self, ids: torch.Tensor) -> torch.Tensor: ...
    def block(self, layer: LayerPlan, x: torch.Tensor) -> torch.Tensor: ...
    def logits(self, final: torch.Tensor) -> torch.Tensor: ...
    def tensor_findings(self, part: int | str, checks: TensorChecks) -> list[str]: ...
    def integrity(self) -> list[str]: ...


@dataclass
class TensorChecks:
    """What tensors are checked against: the calibrated amax and the BF16 source (if present)."""

    table: Any = None  # builder.quantize.amax.AmaxTable
    source: Any = None  # builder.io.checkpoint.HFCheckpoint of the golden's source
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class PartError:
    part: str  # "embedding", "block 12", "lm_head"
    index: int | None
    kind: str
    ffn_width: int | None
    error: float

    def label(self) -> str:
        if self.index is None:
            return self.part
        width = f", width {self.ffn_width}" if self.ffn_width else ""
        return f"block {self.index} ({self.kind}{width})"


@dataclass
class Localization:
    parts: list[PartError]
    median_block_error: float
    outliers: list[PartError]
    findings: dict[str, list[str]]  # part label -> tensor findings
    integrity: list[str]
    checks: list[str]

    @property
    def worst(self) -> PartError:
        return max(self.parts, key=lambda p: p.error)

    @property
    def faulty(self) -> bool:
        return bool(self.outliers or self.integrity or any(self.findings.values()))

    def lines(self) -> list[str]:
        """Human-readable: the verdict line per faulty part, then the ranking head."""
        out = [f"integrity: {line}" for line in self.integrity]
        for part in self.outliers or (
            [self.worst] if self.findings.get(self.worst.label()) else []
        ):
            ratio = (
                part.error / self.median_block_error if self.median_block_error else float("inf")
            )
            line = (
                f"{part.label()}: output error {part.error:.3g} ({ratio:.0f}x the median block's "
                f"{self.median_block_error:.3g})"
            )
            details = self.findings.get(part.label()) or []
            out.append(
                line
                + (
                    ": " + "; ".join(details)
                    if details
                    else ": no tensor finding (numerics of the part itself)"
                )
            )
        if not self.outliers:
            out.append(
                f"no part out of line: worst {self.worst.label()} error {self.worst.error:.3g}, "
                f"median block {self.median_block_error:.3g}"
            )
        return out

    def to_json(self) -> dict[str, Any]:
        ranked = sorted(self.parts, key=lambda p: -p.error)
        return {
            "method": (
                "each part on the golden's own inputs; error = ||artifact - golden|| / ||golden "
                "update||"
            ),
            "median_block_error": self.median_block_error,
            "outlier_rule": f"error > {OUTLIER_RATIO} x median block error and > {ABSOLUTE_FLOOR}",
            "worst": self.worst.label(),
            "outliers": [p.label() for p in self.outliers],
            "findings": self.findings,
            "integrity": self.integrity,
            "checks": self.checks,
            "lines": self.lines(),
            "ranking": [
                {
                    "part": p.label(),
                    "index": p.index,
                    "kind": p.kind,
                    "ffn_width": p.ffn_width,
                    "error": p.error,
                }
                for p in ranked
            ],
        }


def relative(a: torch.Tensor, g: torch.Tensor, base: torch.Tensor) -> float:
    return float((a.float() - g.float()).norm() / base.float().norm().clamp(min=1e-30))


@torch.no_grad()
def localize(
    golden: Golden, localizer: Localizer, checks: TensorChecks, say=lambda m: None
) -> Localization:
    plan = localizer.plan
    t = golden.tensors
    ids = t["probe.ids"]
    non_empty = [layer for layer in plan.layers if not layer.is_empty]
    first_input = golden.probe_hidden(non_empty[0].index) if non_empty else t["probe.final"]
    parts = [
        PartError(
            "embedding",
            None,
            "embedding",
            None,
            relative(localizer.embed(ids).cpu(), first_input, first_input),
        )
    ]
    for n, layer in enumerate(non_empty):
        x = golden.probe_hidden(layer.index)
        g = (
            golden.probe_hidden(non_empty[n + 1].index)
            if n + 1 < len(non_empty)
            else t["probe.final"]
        )
        a = localizer.block(layer, x).cpu()
        parts.append(
            PartError(
                f"block {layer.index}",
                layer.index,
                block_kind(layer),
                layer.ffn_width,
                relative(a, g, g.float() - x.float()),
            )
        )
        say(f"localize: block {layer.index} error {parts[-1].error:.3g}")
    logits = t["probe.logits"]
    parts.append(
        PartError(
            LM_HEAD_PART,
            None,
            LM_HEAD_PART,
            None,
            relative(localizer.logits(t["probe.final"]).cpu(), logits, logits),
        )
    )
    blocks = [p.error for p in parts if p.index is not None]
    median = statistics.median(blocks) if blocks else 0.0
    outliers = sorted(
        (p for p in parts if p.error > ABSOLUTE_FLOOR and p.error > OUTLIER_RATIO * median),
        key=lambda p: -p.error,
    )
    findings: dict[str, list[str]] = {}
    for part in (outliers or sorted(parts, key=lambda p: -p.error))[:WORST_DETAILED]:
        key = part.index if part.index is not None else part.part
        findings[part.label()] = localizer.tensor_findings(key, checks)
    return Localization(parts, median, outliers, findings, localizer.integrity(), checks.notes)


# ---- what the tensors are checked against --------------------------------------------------------
def amax_from_manifest(manifest: dict[str, Any]):
    """The calibrated amax table recorded in a quantize export's manifest (None if absent)."""
    from builder.quantize.amax import AmaxTable

    per_layer = manifest.get("amax")
    if not isinstance(per_layer, dict):
        return None
    values = {}
    for layer, entries in per_layer.items():
        try:
            prefix = hf_layer_prefix(int(layer.removeprefix("layer ").strip()))
        except ValueError:
            return None
        for rest, value in entries.items():
            values[f"{prefix}{rest}_quantizer"] = float(value)
    kv = (manifest.get("quantization") or {}).get("kv_cache") == "FP8"
    return AmaxTable(values, kv_cache=kv)


def tensor_checks(artifact: Path, golden: Golden) -> TensorChecks:
    from builder.convert.sources import source_fingerprint
    from builder.errors import UserError
    from builder.io.checkpoint import HFCheckpoint
    from builder.io.manifest import read_manifest

    checks = TensorChecks()
    try:
        checks.table = amax_from_manifest(read_manifest(artifact))
    except UserError:
        checks.table = None
    checks.notes.append(
        "scaling factors vs calibrated amax: "
        + (
            "checked (amax table from the artifact's manifest)"
            if checks.table
            else "not checked (no amax table in the artifact's manifest)"
        )
    )
    source = golden.document.get("source", {})
    path = Path(source.get("path", ""))
    try:
        ckpt = HFCheckpoint(path) if path.is_dir() else None
        if ckpt is not None and source_fingerprint(ckpt) == source.get("fingerprint"):
            checks.source = ckpt
    except UserError:
        pass
    checks.notes.append(
        "weights vs the golden's source: "
        + (
            f"checked ({path})"
            if checks.source
            else f"not checked (source {path} absent or changed)"
        )
    )
    return checks


# ---- TensorRT-LLM checkpoints --------------------------------------------------------------------
def _belongs(item: Any, part: int | str) -> bool:
    if isinstance(part, int):
        return item.layer is not None and item.layer.index == part
    embedding = item.rule.role is Role.EMBEDDING
    if part == "embedding":
        return embedding
    return item.layer is None and not embedding


def _scale_finding(
    name: str, stored: torch.Tensor, expected: torch.Tensor, amax_label: str
) -> str | None:
    s, e = float(stored.reshape(-1)[0]), float(expected.reshape(-1)[0])
    if abs(s - e) <= SCALE_RTOL * abs(e):
        return None
    return f"{name} = {s:.6g} is {s / e:.3g}x what the calibrated {amax_label} implies ({e:.6g})"


def _weight_finding(name: str, weight: torch.Tensor, source: torch.Tensor, fp8: bool) -> str | None:
    limit = FP8_WEIGHT_LIMIT if fp8 else BF16_WEIGHT_LIMIT
    rel = relative(weight, source, source)
    if rel <= limit:
        return None
    return f"{name} is {rel:.1%} away from the source weights (quantization alone: <= {limit:.2%})"


def trtllm_tensor_findings(ex: Any, part: int | str, checks: TensorChecks) -> list[str]:
    from builder.arch.tensors import Split, kv_cache_scale_name, rank_tensors, scale_names
    from builder.convert.sources import SourceReader, read_plan
    from builder.quantize.export_trtllm import Fp8Transform
    from builder.quantize.fp8 import kv_cache_scale

    plan, tp, pp = ex.plan, ex.tp, ex.pp
    transform = Fp8Transform(checks.table) if checks.table is not None else None
    reader = SourceReader(checks.source, torch.float32) if checks.source is not None else None
    found: list[str] = []
    try:
        for rank in range(tp * pp):
            for item in rank_tensors(plan, tp, pp, rank):
                if not _belongs(item, part):
                    continue
                stored = ex.tensor(rank, item.name).cpu()  # checked on the host, as the source
                label = f"{item.name} (rank {rank})"
                quantized = stored.dtype == torch.float8_e4m3fn
                weight = stored.float()
                if quantized:
                    w_name, a_name = scale_names(item.name)
                    w_scale = ex.tensor(rank, w_name).float().cpu()
                    weight = weight * w_scale
                    if transform is not None:
                        expected_w, expected_a = transform.scales(item)
                        for name, stored_s, exp in (
                            (w_name, w_scale, expected_w),
                            (a_name, ex.tensor(rank, a_name), expected_a),
                        ):
                            kind = "weight amax" if name == w_name else "input amax"
                            finding = _scale_finding(
                                f"{name} (rank {rank})", stored_s, exp, f"{kind}/448"
                            )
                            if finding:
                                found.append(finding)
                if ex.kv_cache_fp8 and transform is not None and item.rule.split is Split.QKV:
                    kv_name = kv_cache_scale_name(item.local)
                    expected = kv_cache_scale(*checks.table.kv(item.layer.index))
                    finding = _scale_finding(
                        f"{kv_name} (rank {rank})",
                        ex.tensor(rank, kv_name),
                        expected,
                        "max(k, v amax)/448 floored at 1",
                    )
                    if finding:
                        found.append(finding)
                if reader is not None and len(item.shape) >= 1:
                    source = reader.assemble(read_plan(plan, item, tp, rank % tp))
                    finding = _weight_finding(label, weight, source, quantized)
                    if finding:
                        found.append(finding)
    finally:
        if reader is not None:
            reader.close()
    return found


# ---- unified HF FP8 exports ----------------------------------------------------------------------
def hf_tensor_findings(stream: Any, part: int | str, checks: TensorChecks) -> list[str]:
    from builder.quantize.amax import layer_linears
    from builder.quantize.export_hf import shared_input_amax
    from builder.quantize.fp8 import scale_from_amax

    plan, ckpt = stream.plan, stream.ckpt
    found: list[str] = []
    if isinstance(part, int):
        layer = plan.layers[part]
        for module in layer_linears(plan, layer):
            w = ckpt.read(f"{module}.{WEIGHT}")
            w_name, x_name = hf_scale_names(module)
            w_scale, x_scale = ckpt.read(w_name), ckpt.read(x_name)
            if checks.table is not None:
                for name, stored, expected in (
                    (w_name, w_scale, scale_from_amax(checks.table.weight(module))),
                    (
                        x_name,
                        x_scale,
                        scale_from_amax(shared_input_amax(checks.table, module)),
                    ),
                ):
                    finding = _scale_finding(name, stored, expected, "amax/448")
                    if finding:
                        found.append(finding)
            if checks.source is not None:
                finding = _weight_finding(
                    f"{module}.{WEIGHT}",
                    w.float() * w_scale.float(),
                    checks.source.read(f"{module}.{WEIGHT}").float(),
                    True,
                )
                if finding:
                    found.append(finding)
        if layer.has_kv_cache and checks.table is not None and checks.table.kv_cache:
            amaxes = checks.table.kv(layer.index)
            for role, amax in zip(cache_roles(), amaxes, strict=True):
                name = hf_kv_scale_name(role, layer.index)
                if name in ckpt:
                    finding = _scale_finding(
                        name,
                        ckpt.read(name),
                        scale_from_amax(amax),
                        f"{ROLES[role].cache} amax/448",
                    )
                    if finding:
                        found.append(finding)
        return found
    roles = (Role.EMBEDDING,) if part == "embedding" else (Role.FINAL_NORM, Role.LM_HEAD)
    names = [hf_weight(role) for role in roles]
    for name in names:
        if checks.source is not None and name in ckpt and name in checks.source:
            finding = _weight_finding(
                name, ckpt.read(name).float(), checks.source.read(name).float(), False
            )
            if finding:
                found.append(finding)
    return found


# ---- files against the manifest ------------------------------------------------------------------
def manifest_findings(directory: Path) -> list[str]:
    """Files whose bytes differ from the artifact's manifest; swapped files named as such."""
    from builder.errors import UserError
    from builder.io.manifest import entry_digest, file_digest, read_manifest

    try:
        manifest = read_manifest(directory)
    except UserError as err:
        return [str(err)]
    entries = manifest.get("files", {})
    recorded = {name: entry_digest(entry) for name, entry in entries.items()}
    owner = {digest: name for name, digest in recorded.items() if digest}
    found = []
    for name in entries:
        path = directory / name
        if not path.is_file():
            found.append(f"{path}: missing (listed in the manifest)")
            continue
        if recorded[name] is None:
            found.append(f"{name}: the manifest records no digest for it")
            continue
        algorithm, value = recorded[name]
        actual = file_digest(path, algorithm)
        if actual == value:
            continue
        other = owner.get((algorithm, actual))
        if other:
            found.append(
                f"{name} holds the bytes the manifest records for {other} (files swapped or "
                "renamed)"
            )
        else:
            found.append(
                f"{name}: {algorithm} differs from the manifest (modified after it was written)"
            )
    return found

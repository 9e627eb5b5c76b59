"""Comparing bench records: the regression gate and the FP8-vs-BF16 table.

The gate matches records by artifact kind and workload (settings["workload"]: ISL, OSL,
concurrency), not by sha256: the current build is a new artifact of the same kind. For each gated
metric the change is measured in the metric's bad direction (throughput down, latency up),
relative to the base median:

    worse = (base - current) / base   for "higher is better"
            (current - base) / base   for "lower is better"

A regression needs BOTH worse > max_regression AND |current - base| > noise, where noise =
max(base spread, current spread) (spread = max - min over a record's repeats). Shared
machines are noisy: a change inside the measured spread is reported as "noise", never as a
regression. Medians are compared, never single runs; p99s are shown but not gated by default
(too noisy, as PyTorch's benchmark CI found).

The precision mode lays an FP8 artifact's records beside its BF16 counterpart's (same
workload, runtime and device): per metric the ratio and the speed-up (> 1: FP8 better), plus
the accuracy of both artifacts from verify records.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from builder.errors import UserError
from builder.report.records import Better, Metric, RecordKind, RunRecord, read_record

GATED = (
    "request_throughput",
    "output_token_throughput",
    "output_token_throughput_per_user",
    "ttft_p50",
    "tpot_p50",
    "itl_p50",
    "e2e_latency_p50",
)
SHOWN = GATED + ("ttft_p99", "itl_p99", "peak_memory")
ACCURACY = ("kl_mean", "kl_p99", "top1", "top1_agreement", "ppl_ratio", "greedy_prefix_mean")


class Change(StrEnum):
    """A row's verdict: only a gated metric's regression beyond the noise fails a run."""

    OK = "ok"
    IMPROVED = "improved"
    NOISE = "noise"  # worse by more than allowed, but within the measured spread
    WORSE = "worse"  # an ungated metric's regression
    REGRESSION = "REGRESSION"


@dataclass(frozen=True)
class Row:
    workload: str
    metric: str
    unit: str
    better: Better
    base: float
    current: float
    noise: float
    gated: bool

    @property
    def ratio(self) -> float:
        return self.current / self.base if self.base else float("inf")

    @property
    def worse(self) -> float:
        """Relative change in the bad direction (positive: worse)."""
        if not self.base or self.better is Better.NONE:
            return 0.0
        change = (self.current - self.base) / abs(self.base)
        return -change if self.better is Better.HIGHER else change

    def verdict(self, max_regression: float) -> Change:
        beyond_noise = abs(self.current - self.base) > self.noise
        if self.worse > max_regression:
            if not beyond_noise:
                return Change.NOISE
            return Change.REGRESSION if self.gated else Change.WORSE
        if -self.worse > max_regression and beyond_noise:
            return Change.IMPROVED
        return Change.OK


@dataclass
class Comparison:
    rows: list[Row]
    max_regression: float
    unmatched: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def regressions(self) -> list[Row]:
        return [r for r in self.rows if r.verdict(self.max_regression) is Change.REGRESSION]

    def markdown(self) -> str:
        lines = [
            (
                f"max regression {self.max_regression:.1%}; a regression must also exceed the "
                "measured spread (max - min over repeats) of either side"
            ),
            "",
            "| workload | metric | base | current | change | spread | verdict |",
            "|---|---|---:|---:|---:|---:|---|",
        ]
        for r in self.rows:
            change = (r.current - r.base) / r.base if r.base else 0.0
            lines.append(
                f"| {r.workload} | {r.metric} ({r.unit}) | {r.base:.4g} | {r.current:.4g} | "
                f"{change:+.1%} | {r.noise:.3g} | {r.verdict(self.max_regression)} |"
            )
        for note in self.unmatched + self.warnings:
            lines.append(f"\n- {note}")
        regressions = self.regressions
        lines.append("")
        lines.append(
            f"**{len(regressions)} regression(s)**" if regressions else "**no regression**"
        )
        return "\n".join(lines)


# ---- loading --------------------------------------------------------------------------------
def load_records(spec: str | Path, history: str | Path | None = None) -> list[RunRecord]:
    """Records of a JSON file, of every JSON record under a directory, or, with `history`, of
    an artifact (sha256 prefix or path) in the SQLite history."""
    if history is not None:
        from builder.report.history import History

        with History(history) as db:
            records = db.query(artifact=str(spec))
        if not records:
            raise UserError(f"{history}: no records of artifact {spec!r}")
        return records
    path = Path(spec)
    if path.is_file():
        return [read_record(path)]
    if path.is_dir():
        records = []
        for file in sorted(path.rglob("*.json")):
            try:
                records.append(read_record(file))
            except UserError:
                continue  # other JSON files (AIPerf exports, manifests) live beside records
        if not records:
            raise UserError(f"{path}: no run records")
        return records
    raise UserError(f"{path}: no such record file or directory")


def latest_by_key(
    records: Iterable[RunRecord], key: Callable[[RunRecord], str], warnings: list[str]
) -> dict[str, RunRecord]:
    """The newest bench record per key. Two different artifacts under one key would make the
    comparison pick one of them silently: that is said in `warnings`."""
    out: dict[str, RunRecord] = {}
    for record in sorted(
        (r for r in records if r.kind is RecordKind.BENCH), key=lambda r: r.created
    ):
        name = key(record)
        if name in out and out[name].artifact.sha256 != record.artifact.sha256:
            warnings.append(
                f"{name}: records of two artifacts ({out[name].artifact.kind} "
                f"{out[name].artifact.sha256[:10]}, {record.artifact.kind} "
                f"{record.artifact.sha256[:10]}): only the newest is compared"
            )
        out[name] = record
    return out


def workload_of(record: RunRecord) -> str:
    return str(record.settings.get("workload", ""))


def kind_and_workload(record: RunRecord) -> str:
    """The gate's key: the same kind of artifact (a new build of it: the sha256 changes) on
    the same workload."""
    return f"{record.artifact.kind} · {workload_of(record)}"


def _noise(a: Metric, b: Metric) -> float:
    return max(a.spread, b.spread)


# ---- the regression gate ----------------------------------------------------------------------
def compare(
    base: list[RunRecord],
    current: list[RunRecord],
    max_regression: float = 0.05,
    metrics: Iterable[str] | None = None,
) -> Comparison:
    gated = tuple(metrics) if metrics else GATED
    shown = gated + tuple(m for m in SHOWN if m not in gated)
    result = Comparison([], max_regression)
    old = latest_by_key(base, kind_and_workload, result.warnings)
    new = latest_by_key(current, kind_and_workload, result.warnings)
    for workload in sorted(set(old) | set(new), key=_workload_order):
        if workload not in old or workload not in new:
            side = "base" if workload in old else "current"
            result.unmatched.append(f"workload {workload} only in the {side} records: not compared")
            continue
        a, b = old[workload], new[workload]
        if (a.runtime, a.device) != (b.runtime, b.device):
            result.warnings.append(
                f"{workload}: runtime/device differ ({a.runtime} on {a.device} vs "
                f"{b.runtime} on {b.device})"
            )
        for name in shown:
            if name in a.metrics and name in b.metrics:
                ma, mb = a.metrics[name], b.metrics[name]
                result.rows.append(
                    Row(
                        workload,
                        name,
                        ma.unit,
                        ma.better,
                        ma.value,
                        mb.value,
                        _noise(ma, mb),
                        name in gated,
                    )
                )
    if not result.rows:
        raise UserError("nothing to compare: no bench workload present in both BASE and CURRENT")
    return result


def _workload_order(key: str) -> tuple:
    """Artifact kind (if the key has one), then ISL, OSL and concurrency as numbers."""
    kind, _, workload = key.rpartition(" · ")
    parts = dict(item.split("=", 1) for item in workload.split(",") if "=" in item)
    return (kind,) + tuple(
        int(parts.get(k, 0)) if str(parts.get(k, "0")).isdigit() else 0
        for k in ("isl", "osl", "concurrency")
    )


# ---- FP8 against BF16 ---------------------------------------------------------------------------
@dataclass
class PrecisionComparison:
    reference: str  # artifact kinds
    candidate: str
    rows: list[Row]
    accuracy: dict[str, dict[str, float]]  # artifact label -> metric -> value
    warnings: list[str]

    def speedup(self, row: Row) -> float:
        """> 1: the candidate is better by that factor."""
        if not row.base or not row.current:
            return float("nan")
        return row.current / row.base if row.better is Better.HIGHER else row.base / row.current

    def headline(self) -> str:
        parts = [
            f"{self.speedup(r):.2f}x at concurrency {r.workload.rsplit('=', 1)[-1]}"
            for r in self.rows
            if r.metric == "output_token_throughput"
        ]
        return (
            f"{self.candidate} vs {self.reference} output tokens/s: " + ", ".join(parts)
            if parts
            else ""
        )

    def markdown(self) -> str:
        lines = [
            self.headline(),
            "",
            f"| workload | metric | {self.reference} | {self.candidate} | ratio | speed-up |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for r in self.rows:
            lines.append(
                f"| {r.workload} | {r.metric} ({r.unit}) | {r.base:.4g} | {r.current:.4g} | "
                f"{r.ratio:.3f} | {self.speedup(r):.2f}x |"
            )
        if self.accuracy:
            names = sorted({k for values in self.accuracy.values() for k in values})
            lines += [
                "",
                "| accuracy (verify) | " + " | ".join(names) + " |",
                "|---|" + "---:|" * len(names),
            ]
            for label, values in self.accuracy.items():
                lines.append(
                    f"| {label} | "
                    + " | ".join(f"{values[n]:.4g}" if n in values else "-" for n in names)
                    + " |"
                )
        else:
            lines += ["", "accuracy: no verify records of either artifact were given"]
        lines += [f"- {w}" for w in self.warnings]
        return "\n".join(lines)


def accuracy_of(records: Iterable[RunRecord], sha256: str) -> dict[str, float]:
    verify = [r for r in records if r.kind is RecordKind.VERIFY and r.artifact.sha256 == sha256]
    if not verify:
        return {}
    latest = max(verify, key=lambda r: r.created)
    return {k: m.value for k, m in latest.metrics.items() if k in ACCURACY or k.startswith("kl")}


def compare_precision(
    reference: list[RunRecord], candidate: list[RunRecord], extra: Iterable[RunRecord] = ()
) -> PrecisionComparison:
    """`candidate` (e.g. FP8) beside `reference` (its BF16 source), per workload and metric."""
    rows: list[Row] = []
    warnings: list[str] = []
    old = latest_by_key(reference, workload_of, warnings)
    new = latest_by_key(candidate, workload_of, warnings)
    for workload in sorted(set(old) & set(new), key=_workload_order):
        a, b = old[workload], new[workload]
        if (a.runtime, a.device) != (b.runtime, b.device):
            warnings.append(
                f"{workload}: not the same runtime and machine ({a.runtime} on {a.device} "
                f"vs {b.runtime} on {b.device}): ratios mix effects"
            )
        for name in SHOWN:
            if name in a.metrics and name in b.metrics:
                ma, mb = a.metrics[name], b.metrics[name]
                rows.append(
                    Row(
                        workload,
                        name,
                        ma.unit,
                        ma.better,
                        ma.value,
                        mb.value,
                        _noise(ma, mb),
                        False,
                    )
                )
    if not rows:
        raise UserError("precision compare: no workload benched for both artifacts")
    first_a, first_b = next(iter(old.values())), next(iter(new.values()))
    pool = [*reference, *candidate, *extra]
    accuracy = {}
    for record in (first_a, first_b):
        values = accuracy_of(pool, record.artifact.sha256)
        if values:
            accuracy[f"{record.artifact.kind} {record.artifact.sha256[:10]}"] = values
    return PrecisionComparison(
        first_a.artifact.kind, first_b.artifact.kind, rows, accuracy, warnings
    )


def parse_threshold(text: str) -> float:
    """'5%' or '0.05' -> 0.05."""
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < 10:
        raise UserError(f"--max-regression {text!r}: expected a percentage such as 5% (or 0.05)")
    return value

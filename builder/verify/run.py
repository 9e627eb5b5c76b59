"""`builder verify`: score an artifact on the golden's prompts, apply thresholds, write the record.

Exit codes: 0 pass, 1 fail (a threshold broken, or localization found a fault), 2 bad input.
"""

from __future__ import annotations

import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from builder.errors import UserError
from builder.report.records import Artifact, Metric, RecordKind, RunRecord, Verdict, write_record
from builder.verify import metrics
from builder.verify.golden import Golden
from builder.verify.metrics import METRICS, Comparison, compare_scores
from builder.verify.sampling import Sampling

DEFAULT_SECTION = "verify"


@dataclass(frozen=True)
class Threshold:
    metric: str
    bound: str  # "max" or "min"
    limit: float

    def holds(self, value: float) -> bool:
        return value <= self.limit if self.bound == "max" else value >= self.limit

    def describe(self) -> str:
        return f"{'<=' if self.bound == 'max' else '>='} {self.limit:g}"


def load_thresholds(
    path: Path | None = None, section: str = DEFAULT_SECTION
) -> dict[str, Threshold]:
    """`<metric>_max` / `<metric>_min` keys of one section of calib/thresholds.toml."""
    from builder.quantize.calib import calib_dir

    path = path or calib_dir() / "thresholds.toml"
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise UserError(f"{path}: unreadable ({err})") from None
    if section not in data:
        raise UserError(f"{path}: no [{section}] section (have {', '.join(data)})")
    out = {}
    for key, value in data[section].items():
        metric, _, bound = key.rpartition("_")
        if bound not in ("max", "min") or metric not in METRICS:
            continue  # settings recorded beside the limits
        if not isinstance(value, int | float):
            raise UserError(f"{path}: [{section}] {key} must be a number")
        out[metric] = Threshold(metric, bound, float(value))
    if not out:
        raise UserError(
            f"{path}: [{section}] has no <metric>_max/_min limits (metrics: {', '.join(METRICS)})"
        )
    return out


@dataclass
class VerifyResult:
    record: RunRecord
    metrics: dict[str, float]
    failures: list[str]
    unmeasured: list[str]
    localization: Any = None
    comparison: Comparison | None = None  # the per-position series behind the metrics
    record_path: Path | None = None
    table: str = ""

    @property
    def exit_code(self) -> int:
        return 0 if self.record.verdict is Verdict.PASS else 1


@dataclass(frozen=True)
class VerifyOptions:
    thresholds: Path | None = None
    section: str = DEFAULT_SECTION
    localize: bool = False
    max_prompts: int | None = None
    report: Path | None = None
    settings: dict[str, Any] = field(default_factory=dict)


def compare(
    golden: Golden, runtime: Any, opts: VerifyOptions, say=lambda m: None
) -> tuple[Comparison, list[dict[str, Any]]]:
    caps = runtime.capabilities
    n = golden.continuation if caps.greedy else 0
    cmp = Comparison([], [], [], [], [], n)
    per_prompt = []
    count = (
        len(golden.prompts)
        if opts.max_prompts is None
        else min(opts.max_prompts, len(golden.prompts))
    )
    for j in range(count):
        prompt = golden.prompts[j]
        ids = golden.ids(j)
        row: dict[str, Any] = {"id": prompt["id"], "tokens": int(ids.numel())}
        if caps.prompt_scores:
            ref = golden.score(j)
            art = runtime.score(ids, ref.top_ids if caps.full_distribution else None)
            kl, agree = compare_scores(ref, art)
            cmp.kl.append(kl)
            cmp.agree.append(agree)
            cmp.golden_targets.append(ref.target_logprobs)
            cmp.artifact_targets.append(art.target_logprobs)
            row |= {
                "kl_mean": float(kl.mean()),
                "top1_agreement": float(agree.double().mean()),
                "nll_mean": float(-art.target_logprobs.double().mean()),
            }
        if n:
            reference = golden.greedy(j)
            continuation = runtime.generate(ids, Sampling.greedy(n))
            prefix = metrics.matching_prefix(reference, continuation)
            cmp.prefix.append(prefix)
            row |= {"greedy_prefix": prefix, "greedy": continuation}
        per_prompt.append(row)
        say(
            f"prompt {j + 1}/{count} {prompt['id']}: "
            + ", ".join(f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float))
        )
    return cmp, per_prompt


def kl_per_position(kl: list[torch.Tensor]) -> list[float]:
    """Mean KL at each position over the prompts long enough to have it (reports plot it)."""
    longest = max((len(row) for row in kl), default=0)
    means = []
    for i in range(longest):
        values = [float(row[i]) for row in kl if len(row) > i]
        means.append(sum(values) / len(values))
    return means


def verify(
    golden_dir: str | Path, runtime: Any, opts: VerifyOptions, say=lambda m: None
) -> VerifyResult:
    started = time.perf_counter()
    golden = Golden.load(golden_dir)
    check_same_model(golden, runtime)
    thresholds = load_thresholds(opts.thresholds, opts.section)
    caps = runtime.capabilities
    say(f"runtime {runtime.name}: metrics possible: {', '.join(caps.metrics()) or 'none'}")
    for note in caps.notes:
        say(f"  {note}")
    cmp, per_prompt = compare(golden, runtime, opts, say)
    values = cmp.summary()
    task_rows = None
    if golden.document.get("tasks") and caps.greedy:
        task_values, task_rows = score_tasks(golden, runtime, say)
        values |= task_values
    failures = [
        f"{name} {values[name]:.4g} breaks {t.describe()}"
        for name, t in thresholds.items()
        if name in values and not t.holds(values[name])
    ]
    unmeasured = [name for name in thresholds if name not in values]
    localization = None
    if opts.localize:
        localization = run_localization(golden, runtime, say)
        if localization is not None and localization.faulty:
            failures.append("localization: " + "; ".join(localization.lines()))
    verdict = Verdict.FAIL if failures else Verdict.PASS
    record = RunRecord(
        kind=RecordKind.VERIFY,
        model=golden.document["source"]["path"],
        artifact=Artifact(runtime.artifact.path, runtime.artifact.kind, runtime.artifact.sha256),
        runtime=runtime.name,
        device=runtime.device,
        settings={
            "golden": str(Path(golden_dir).resolve()),
            "golden_settings": golden.settings,
            "golden_sha256": _golden_sha(golden),
            "prompts": len(per_prompt),
            "capabilities": caps.to_json(),
            "artifact_details": runtime.artifact.details,
            "kl": "golden top-k + other bucket (builder.verify.metrics)",
            "percentile_method": metrics.PERCENTILE_METHOD,
            **opts.settings,
        },
        metrics={
            name: Metric(value, METRICS[name].unit, METRICS[name].definition, METRICS[name].better)
            for name, value in values.items()
        },
        thresholds={name: {"bound": t.bound, "limit": t.limit} for name, t in thresholds.items()},
        verdict=verdict,
        details={
            "per_prompt": per_prompt,
            "kl_per_position": kl_per_position(cmp.kl),
            "tasks": task_rows,
            "failures": failures,
            "unmeasured": unmeasured,
            "localization": localization.to_json() if localization is not None else None,
            "seconds": round(time.perf_counter() - started, 3),
        },
    )
    result = VerifyResult(record, values, failures, unmeasured, localization, cmp)
    result.table = verdict_table(result, thresholds)
    if opts.report is not None:
        result.record_path = write_record(opts.report, record)
        (Path(opts.report) / result.record_path.with_suffix(".md").name).write_text(
            result.table + "\n"
        )
    return result


def check_same_model(golden: Golden, runtime: Any) -> None:
    """Refuse (bad input, exit 2) an artifact whose shape is not the golden's model: scored, it
    would fail like a broken artifact; localized, its blocks cannot take the golden's states.
    Runtimes that run our own code know their plan; servers show only their answers."""
    plan = getattr(runtime, "plan", None)
    if plan is None:
        return
    want = golden.document["model"]
    have = {"layers": plan.num_layers, "hidden": plan.hidden_size, "vocab": plan.vocab_size}
    differ = [
        f"{key} {have[key]} (golden {want.get(key)})" for key in have if have[key] != want.get(key)
    ]
    if differ:
        raise UserError(
            f"{runtime.artifact.path}: not the golden's model ({', '.join(differ)}; golden "
            f"{golden.path} is of {golden.document['source']['path']})"
        )


def score_tasks(golden: Golden, runtime: Any, say) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """The artifact's answers to the golden's task set in each reasoning mode the golden has,
    with the same prompts, lengths and seeds (builder.verify.golden.task_runs). Metrics of
    reasoning off keep their names (task_accuracy, ...); reasoning on adds `_reasoning_on`."""
    from builder.io.manifest import sha256_file
    from builder.verify.golden import task_runs
    from builder.verify.tasks import load_tasks, reply_text, task_prompt_ids

    spec = golden.document["tasks"]
    if Path(spec["file"]).is_file() and sha256_file(Path(spec["file"])) != spec["sha256"]:
        raise UserError(f"{spec['file']}: the task file changed since golden {golden.path}")
    tasks = load_tasks(spec["file"])
    tokenizer = golden.tokenizer()
    modes = golden.task_modes()
    rows: list[dict[str, Any]] = []
    out: dict[str, float] = {}
    for mode, samplings in task_runs(golden.settings, len(tasks)).items():
        reference, per_task = modes[mode], len(samplings) // len(tasks)
        prompts = [task_prompt_ids(tokenizer, t, reasoning=mode == "reasoning_on") for t in tasks]
        mode_rows = []
        for i, sampling in enumerate(samplings):
            t, s = divmod(i, per_task)
            task, golden_reply = tasks[t], reference["replies"][t][s]
            ids = torch.tensor(prompts[t])
            reply = reply_text(tokenizer, runtime.generate(ids, sampling, tokenizer.eos_token_id))
            mode_rows.append(
                {
                    "mode": mode,
                    "question": task.question,
                    "seed": None if sampling.is_greedy else sampling.seed,
                    "correct": task.correct(reply),
                    "golden_correct": task.correct(golden_reply),
                    "same_reply": reply == golden_reply,
                    "reply": reply,
                }
            )
        acc = sum(r["correct"] for r in mode_rows) / len(mode_rows)
        suffix = "" if mode == "reasoning_off" else f"_{mode}"
        out[f"task_accuracy{suffix}"] = acc
        out[f"golden_task_accuracy{suffix}"] = float(reference["accuracy"])
        if reference["accuracy"] > 0:
            out[f"task_recovery{suffix}"] = acc / reference["accuracy"]
        same = sum(r["same_reply"] for r in mode_rows)
        say(
            f"tasks, {mode.replace('_', ' ')}: {acc:.3f} correct (golden "
            f"{reference['accuracy']:.3f}); {same}/{len(mode_rows)} replies as the golden's"
        )
        rows += mode_rows
    return out, rows


def _golden_sha(golden: Golden) -> str:
    import hashlib

    return hashlib.sha256((golden.path / "manifest.json").read_bytes()).hexdigest()


def run_localization(golden: Golden, runtime: Any, say) -> Any:
    from builder.verify.localize import localize, tensor_checks

    if not runtime.capabilities.localize:
        say(f"--localize: the {runtime.name} runtime cannot run blocks one at a time; skipped")
        return None
    localizer = runtime.localizer()
    return localize(golden, localizer, tensor_checks(Path(runtime.artifact.path), golden), say)


def verdict_table(result: VerifyResult, thresholds: dict[str, Threshold]) -> str:
    r = result.record
    lines = [
        f"### verify: {r.artifact.kind} `{r.artifact.path}` on `{r.runtime}` ({r.device})",
        "",
        (
            f"golden `{r.settings['golden']}`, {r.settings['prompts']} prompts; KL over the "
            "golden top-"
            f"{r.settings['golden_settings']['top_k']} + other bucket; p99: nearest rank"
        ),
        "",
        "| metric | value | threshold | verdict |",
        "|---|---|---|---|",
    ]
    for name, value in result.metrics.items():
        t = thresholds.get(name)
        verdict = ("pass" if t.holds(value) else "**FAIL**") if t else ""
        lines.append(f"| {name} | {value:.5g} | {t.describe() if t else ''} | {verdict} |")
    has_tasks = bool(r.details.get("tasks"))
    for name in result.unmeasured:
        why = "not measured by this runtime"
        if name.startswith("task") and not has_tasks:
            why = "no task set in the golden"
        elif name.startswith("task_recovery") and has_tasks:
            why = "golden accuracy 0 or mode not in the golden: no recovery"
        lines.append(f"| {name} | {why} | {thresholds[name].describe()} | n/a |")
    lines.append("")
    if result.localization is not None:
        lines.append("localization (each part on the golden's inputs):")
        lines.extend(f"- {line}" for line in result.localization.lines())
        ranked = sorted(result.localization.parts, key=lambda p: -p.error)[:5]
        lines.append("- worst parts: " + ", ".join(f"{p.label()} {p.error:.3g}" for p in ranked))
        lines.append("")
    lines.append(
        f"**{str(r.verdict).upper()}**"
        + (": " + "; ".join(result.failures) if result.failures else "")
    )
    return "\n".join(lines)

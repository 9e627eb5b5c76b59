"""FP8 accuracy against the BF16 reference on held-out text: KL, top-1 agreement, perplexity.

The reference is builder's native model in BF16. Each FP8 variant is scored on the same
windows of held-out Wikipedia text (articles never used for calibration):
  trtllm      the exported FP8 TensorRT-LLM checkpoint, run by builder.runtime's executor with
              FP8 semantics (E4M3 activations and weights, fp32 accumulation, FP8 KV cache);
  fake-quant  ModelOpt's fake-quantized reference model with the calibrated amax table.
Metrics per variant: mean over positions of KL(P_bf16 || P_fp8) over the whole vocabulary, the
share of positions whose argmax agrees, and perplexity / reference perplexity, all computed by
builder.verify.metrics (the one implementation `builder verify` uses too). Thresholds live in
calib/thresholds.toml.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from builder.errors import UserError
from builder.quantize.amax import AmaxTable, quantizer_amax
from builder.quantize.calib import calib_dir, load_tokenizer
from builder.verify import metrics
from builder.verify.prompts import heldout_windows

VARIANTS = ("trtllm", "fake-quant")
LIMIT_KEYS = ("kl_max", "top1_min", "ppl_ratio_max")
Logits = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class VariantScore:
    name: str
    windows: int = 0  # each window predicts one token fewer than it has
    kl_sum: float = 0.0
    agree: int = 0
    nll_sum: float = 0.0
    positions: int = 0

    def add(self, ref_logits: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        self.kl_sum += float(metrics.full_kl(ref_logits, logits).sum())
        self.agree += int(metrics.agreement(ref_logits.argmax(-1), logits.argmax(-1)).sum())
        self.nll_sum += float(metrics.nll(metrics.log_probs(logits[:-1]), targets).sum())
        self.positions += logits.shape[0]

    @property
    def kl(self) -> float:
        return self.kl_sum / self.positions

    @property
    def top1(self) -> float:
        return self.agree / self.positions

    def perplexity(self) -> float:
        return math.exp(self.nll_sum / (self.positions - self.windows))


@dataclass
class AccuracyRow:
    variant: str
    kl: float
    top1: float
    perplexity: float
    ppl_ratio: float


@dataclass
class AccuracyReport:
    model: str
    quantized: str
    windows: int
    seq_len: int
    tokens: int
    dtype: str
    reference_perplexity: float
    rows: list[AccuracyRow] = field(default_factory=list)
    thresholds: dict[str, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"passed": self.passed}


# ---- models
# -----------------------------------------------------------------------------------------------
def reference_logits(src: Path, dtype: torch.dtype, device: str) -> Logits:
    from builder.model import load_reference_model

    model = load_reference_model(src, dtype=dtype, device=device)
    return lambda ids: _forward(model, ids)


@torch.no_grad()
def _forward(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids[None].to(model.device), use_cache=False).logits[0].float().cpu()


def fake_quant_model(
    src: Path, table: AmaxTable, dtype: torch.dtype, device: str, trtllm_grid: bool = False
) -> torch.nn.Module:
    """The reference model fake-quantized by ModelOpt with `table`'s amax (no recalibration).

    ModelOpt calibrates the weight quantizers itself; every enabled quantizer then gets the
    table's value. `trtllm_grid`: use the scales the TensorRT-LLM checkpoint shares (q/k/v
    and gate/up maxed, KV floored at 1.0) instead of the per-module ones.
    """
    from builder.model import load_reference_model
    from builder.quantize import recipe

    model = load_reference_model(src, dtype=dtype, device=device)
    if trtllm_grid:
        from builder.quantize.export_trtllm import trtllm_effective_table

        table = trtllm_effective_table(table, model.plan)
    recipe.quantize(model, table.kv_cache, lambda m: None)
    enabled = _enabled(model)
    for name, module in model.named_modules():
        if name in enabled and name in table.values:
            module.amax = torch.tensor(table.values[name], dtype=dtype, device=device)
    found = quantizer_amax(model)
    wrong = [k for k, v in found.items() if v != table.values.get(k)]
    if wrong:
        raise UserError(f"fake-quant model disagrees with the amax table at {wrong[0]}")
    fold_weight_quantizers(model)
    return model


@torch.no_grad()
def fold_weight_quantizers(model: torch.nn.Module) -> None:
    """Fake-quantize each weight once and switch its quantizer off: the same forward result
    (weight fake quant is deterministic) without redoing it on every call."""
    for module in model.modules():
        quantizer = getattr(module, "weight_quantizer", None)
        if quantizer is not None and quantizer.is_enabled:
            module.weight.copy_(quantizer(module.weight))
            quantizer.disable()


def _enabled(model: torch.nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if getattr(m, "is_enabled", False)}


def trtllm_logits(directory: Path, dtype: torch.dtype, device: str) -> Logits:
    from builder.runtime import TrtllmCheckpointExecutor

    executor = TrtllmCheckpointExecutor(directory, dtype=dtype, device=device)
    return lambda ids: executor(ids.to(device)).float().cpu()


# ---- evaluation
# ---------------------------------------------------------------------------------------------
def evaluate_accuracy(
    src: str | Path,
    quantized: str | Path,
    *,
    variants: Sequence[str] = VARIANTS,
    windows: int = 8,
    seq_len: int = 256,
    dtype: torch.dtype = torch.bfloat16,
    device: str = "cpu",
    thresholds: str | None = None,
) -> AccuracyReport:
    """Score the FP8 outputs of `builder quantize` (dir `quantized`) against BF16 `src`.

    `trtllm` is scored when `quantized/trtllm` exists (it is skipped for --format hf).

    `thresholds` names a section of calib/thresholds.toml to check (failures are listed in
    the report, not raised).
    """
    src, quantized = Path(src), Path(quantized)
    ids = heldout_windows(load_tokenizer(src), windows, seq_len)
    models: dict[str, Logits] = {}
    if "trtllm" in variants and (quantized / "trtllm").is_dir():
        models["trtllm"] = trtllm_logits(quantized / "trtllm", dtype, device)
    if "fake-quant" in variants:
        model = fake_quant_model(src, AmaxTable.load(quantized / "amax.json"), dtype, device)
        models["fake-quant"] = lambda x: _forward(model, x)
    if not models:
        raise UserError(f"{quantized}: none of the FP8 variants {list(variants)} is available")
    reference = reference_logits(src, dtype, device)
    ref_score = VariantScore("bf16", windows=windows)
    scores = {name: VariantScore(name, windows=windows) for name in models}
    for window in ids:
        ref = reference(window)
        ref_score.add(ref, ref, window[1:])
        for name, logits in models.items():
            scores[name].add(ref, logits(window), window[1:])
    ref_ppl = ref_score.perplexity()
    name = str(dtype).removeprefix("torch.")
    report = AccuracyReport(
        str(src), str(quantized), windows, seq_len, windows * seq_len, name, ref_ppl
    )
    for name, score in scores.items():
        ppl = score.perplexity()
        report.rows.append(AccuracyRow(name, score.kl, score.top1, ppl, ppl / ref_ppl))
    if thresholds:
        report.thresholds = load_thresholds(thresholds)
        report.failures = threshold_failures(report, report.thresholds)
    return report


# ---- thresholds
# ------------------------------------------------------------------------------------------------
def load_thresholds(section: str, path: Path | None = None) -> dict[str, float]:
    path = path or calib_dir() / "thresholds.toml"
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise UserError(f"{path}: unreadable ({err})") from None
    if section not in data:
        raise UserError(f"{path}: no [{section}] section (have {', '.join(data)})")
    return {k: float(v) for k, v in data[section].items() if k in LIMIT_KEYS}


def threshold_setup(section: str, path: Path | None = None) -> dict[str, Any]:
    """The measurement settings a threshold section was calibrated with (sizes, dtype)."""
    path = path or calib_dir() / "thresholds.toml"
    data = tomllib.loads(path.read_text())[section]
    return {k: v for k, v in data.items() if k not in LIMIT_KEYS}


def threshold_failures(report: AccuracyReport, limits: dict[str, float]) -> list[str]:
    failures = []
    for row in report.rows:
        checks = (
            ("kl_max", row.kl, lambda v, lim: v <= lim, "mean KL"),
            ("top1_min", row.top1, lambda v, lim: v >= lim, "top-1 agreement"),
            ("ppl_ratio_max", row.ppl_ratio, lambda v, lim: v <= lim, "perplexity ratio"),
        )
        for key, value, ok, label in checks:
            if key in limits and not ok(value, limits[key]):
                failures.append(f"{row.variant}: {label} {value:.4f} breaks {key} = {limits[key]}")
    return failures


def format_table(report: AccuracyReport) -> str:
    """The accuracy table as Markdown (what the demo and the closing notes print)."""
    ref = {"bfloat16": "BF16", "float32": "FP32", "float16": "FP16"}.get(report.dtype, report.dtype)
    heading = (
        f"held-out text: {report.windows} x {report.seq_len} tokens; {ref} perplexity "
        f"{report.reference_perplexity:.3f}"
    )
    lines = [
        heading,
        "",
        f"| FP8 variant | mean KL({ref} || FP8) | top-1 agreement | perplexity | ratio |",
        "|---|---|---|---|---|",
    ]
    for row in report.rows:
        lines.append(
            f"| {row.variant} | {row.kl:.5f} | {row.top1:.4f} | {row.perplexity:.3f} | "
            f"{row.ppl_ratio:.4f} |"
        )
    if report.thresholds:
        lines.append("")
        lines.append("thresholds: " + ", ".join(f"{k} {v}" for k, v in report.thresholds.items()))
        lines.append("PASS" if report.passed else "FAIL: " + "; ".join(report.failures))
    return "\n".join(lines)

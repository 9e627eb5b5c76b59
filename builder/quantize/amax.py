"""The amax table: every calibrated ModelOpt quantizer's amax, keyed by its module path.

Keys are ModelOpt's quantizer paths in a whole HF model, e.g.
`model.layers.3.self_attn.q_proj.weight_quantizer` or `model.layers.3.self_attn.k_bmm_quantizer`.
Values are the quantizer's `_amax` as a Python float: the buffer is bf16 or fp32, both exact
in a double, so JSON round-trips them bit for bit. Both exporters read scales from here and
never recompute an amax.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from builder.arch.plan import AttentionKind, LayerPlan, ModelPlan
from builder.arch.tensors import layer_hf_shapes
from builder.errors import UserError
from builder.quantize.fp8 import check_amax

WEIGHT = "weight_quantizer"
INPUT = "input_quantizer"
K_BMM = "k_bmm_quantizer"
V_BMM = "v_bmm_quantizer"
KINDS = (WEIGHT, INPUT, K_BMM, V_BMM)


class AmaxError(UserError):
    """A calibration result that cannot produce valid FP8 scales."""


def layer_linears(plan: ModelPlan, layer: LayerPlan) -> list[str]:
    """Module paths of the block's linears (what FP8 quantizes), in checkpoint order."""
    return [
        name[: -len(".weight")]
        for name, shape in layer_hf_shapes(plan, layer).items()
        if len(shape) == 2
    ]


def expected_keys(plan: ModelPlan, layer: LayerPlan, kv_cache: bool) -> list[str]:
    keys = [f"{lin}.{kind}" for lin in layer_linears(plan, layer) for kind in (WEIGHT, INPUT)]
    if kv_cache and layer.attention is AttentionKind.ATTENTION:
        attn = f"model.layers.{layer.index}.self_attn"
        keys += [f"{attn}.{K_BMM}", f"{attn}.{V_BMM}"]
    return keys


@dataclass
class AmaxTable:
    """amax per quantizer path, plus what is needed to interpret it."""

    values: dict[str, float] = field(default_factory=dict)
    kv_cache: bool = True

    def update(self, values: Mapping[str, float]) -> None:
        self.values.update(values)

    def get(self, key: str) -> float:
        try:
            return self.values[key]
        except KeyError:
            raise AmaxError(f"no calibrated amax for {key}") from None

    def weight(self, module: str) -> float:
        return self.get(f"{module}.{WEIGHT}")

    def input(self, module: str) -> float:
        return self.get(f"{module}.{INPUT}")

    def kv(self, layer_index: int) -> tuple[float, float]:
        attn = f"model.layers.{layer_index}.self_attn"
        return self.get(f"{attn}.{K_BMM}"), self.get(f"{attn}.{V_BMM}")

    # ---- checks --------------------------------------------------------------------------
    def problems(self, plan: ModelPlan, layers: Iterable[LayerPlan] | None = None) -> list[str]:
        """Every missing or unusable amax for the given layers (default: all)."""
        found = []
        for layer in plan.layers if layers is None else layers:
            for key in expected_keys(plan, layer, self.kv_cache):
                problem = check_amax(self.values.get(key), f"layer {layer.index}: {key}")
                if problem:
                    found.append(problem)
        return found

    def validate(self, plan: ModelPlan, layers: Iterable[LayerPlan] | None = None) -> None:
        problems = self.problems(plan, layers)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise AmaxError(f"calibration is incomplete: {problems[0]}{more}")

    # ---- views ---------------------------------------------------------------------------
    def per_layer(self) -> dict[str, dict[str, float]]:
        """{"layer 3": {"self_attn.q_proj.weight": 0.08, ...}} for manifests and reports."""
        table: dict[str, dict[str, float]] = {}
        for key in sorted(self.values, key=_layer_order):
            parts = key.split(".")
            layer, rest = f"layer {parts[2]}", ".".join(parts[3:])
            table.setdefault(layer, {})[rest.replace("_quantizer", "")] = self.values[key]
        return table

    def to_json(self) -> dict[str, Any]:
        return {
            "kv_cache": self.kv_cache,
            "amax": dict(sorted(self.values.items(), key=lambda kv: _layer_order(kv[0]))),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AmaxTable:
        return cls(
            values={k: float(v) for k, v in data["amax"].items()}, kv_cache=bool(data["kv_cache"])
        )

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> AmaxTable:
        try:
            return cls.from_json(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise AmaxError(f"{path}: unreadable amax table ({err})") from None


def _layer_order(key: str) -> tuple[int, str]:
    parts = key.split(".")
    return (int(parts[2]), key) if len(parts) > 2 and parts[2].isdigit() else (-1, key)


def quantizer_amax(module: Any, prefix: str = "") -> dict[str, float | None]:
    """amax of every enabled FP8 quantizer under `module` (None where it has none).

    `prefix` turns paths relative to a lone decoder layer into whole-model paths.
    """
    found: dict[str, float | None] = {}
    for name, child in module.named_modules():
        kind = name.rsplit(".", 1)[-1]
        if kind not in KINDS or not getattr(child, "is_enabled", False):
            continue
        amax = getattr(child, "_amax", None)
        found[prefix + name] = None if amax is None else float(amax.detach().float().cpu())
    return found


def require_amax(found: Mapping[str, float | None], where: str) -> dict[str, float]:
    """`found` with every value checked: an enabled quantizer must have a finite positive amax."""
    problems = [p for key, value in found.items() if (p := check_amax(value, key))]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise AmaxError(f"{where}: {problems[0]}{more}")
    return {k: float(v) for k, v in found.items()}

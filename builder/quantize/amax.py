"""The amax table: every calibrated ModelOpt quantizer's amax, keyed by its module path.

Keys are ModelOpt's quantizer paths in a whole HF model, as the role table names them
(`RoleSpec.quantizers`): a linear's weight and input quantizers, an attention layer's k/v bmm
quantizers.
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

from builder.arch.plan import LayerPlan, ModelPlan
from builder.arch.tensors import (
    INPUT_QUANTIZER,
    QUANTIZER_KINDS,
    ROLES,
    WEIGHT_QUANTIZER,
    block_roles,
    cache_roles,
    hf_layer_of,
    kv_quantizer,
    split_hf_layer,
)
from builder.arch.tensors import layer_linears as layer_linears  # callers import it from here
from builder.errors import UserError
from builder.quantize.fp8 import check_amax

WEIGHT = WEIGHT_QUANTIZER
INPUT = INPUT_QUANTIZER
KINDS = QUANTIZER_KINDS
K_BMM, V_BMM = KINDS[2:]


class AmaxError(UserError):
    """A calibration result that cannot produce valid FP8 scales."""


def expected_keys(plan: ModelPlan, layer: LayerPlan, kv_cache: bool) -> list[str]:
    """The layer's quantizers: every linear's weight and input ones, then (with an FP8 KV
    cache) the k and v bmm ones."""
    quantizers = [q for role in block_roles(layer) for q in ROLES[role].quantizers(layer.index)]
    linear = [q for q in quantizers if q.endswith((WEIGHT, INPUT))]
    cache = [q for q in quantizers if q not in linear]
    return linear + (cache if kv_cache else [])


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
        k, v = (kv_quantizer(ROLES[role].cache, layer_index) for role in cache_roles())
        return self.get(k), self.get(v)

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
            layer, rest = split_hf_layer(key)
            table.setdefault(f"layer {layer}", {})[rest.replace("_quantizer", "")] = self.values[
                key
            ]
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
    layer = hf_layer_of(key)
    return (-1 if layer is None else layer, key)


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

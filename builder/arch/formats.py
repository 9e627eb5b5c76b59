"""Per-linear quantization formats and the mixed-precision recipe that assigns them (torch-free:
`builder check`, `builder plan --recipe` and convert's layouts read them without torch).

Three formats, each a name both deployment formats know:

  fp8        FP8 E4M3 per-tensor weights and static per-tensor activations (ModelOpt
             FP8_DEFAULT_CFG; quant_algo "FP8" in TensorRT-LLM's QuantAlgo and in
             hf_quant_config.json);
  fp8-pc-pt  FP8 E4M3 weights with one scale per output channel (amax of the row / 448) and
             activations quantized per token at run time (ModelOpt
             FP8_PER_CHANNEL_PER_TOKEN_CFG: weight_quantizer axis 0, input_quantizer
             type "dynamic"; quant_algo "FP8_PER_CHANNEL_PER_TOKEN", QuantAlgo
             FP8_PER_CHANNEL_PER_TOKEN in tensorrt_llm/quantization/mode.py);
  w8a16      INT8 weights with one scale per output channel (amax of the row / 127) and
             activations left in the compute dtype: weight-only, FP8's bytes with BF16
             GEMMs (ModelOpt INT8_WEIGHT_ONLY_CFG, exported as "int8_wo"; quant_algo
             "W8A16" in QuantAlgo and in hf_quant_config.json);
  bf16       left in the checkpoint dtype.

The unit of assignment is one GEMM (builder.arch.tensors.layer_units): q, k and v together,
o, gate and up together (TensorRT-LLM fuses them, so they take one format), down, or the one
linear of a linear-attention / linear-FFN block.

How each file says it (checked against ModelOpt 0.47's export and TensorRT-LLM's sources):
  - unified HF (modelopt/torch/export/quant_utils.py `process_layer_quant_config`,
    convert_hf_config.py): hf_quant_config.json `quantization.quant_algo` is the one format,
    or "MIXED_PRECISION" with `quantization.quantized_layers` = {hf module: {"quant_algo": ...}}
    and unquantized modules simply absent; a per-channel linear stores its weight scale fp32
    [out] and no input scale;
  - TensorRT-LLM (tensorrt_llm/models/modeling_utils.py `QuantConfig`, `LayerQuantConfig`,
    `PretrainedConfig.from_json_file`): config.json `quantization.quant_algo` =
    "MIXED_PRECISION" makes it read `quant_cfg.json` beside it: {"quant_algo":
    "MIXED_PRECISION", "kv_cache_quant_algo": ..., "quantized_layers": {trtllm module:
    {"quant_algo": ...}}}; a module matching none is unquantized. A per-channel linear stores
    a per-channel scale fp32 [out] instead of the per-tensor weight scale and no activation
    scale (ModelOpt model_config_utils: "TensorRT-LLM uses per_channel_scale for FP8 per
    channel weight quantization").

W8A16 is stored differently by the two files, each as its loader reads it:
  - unified HF: the INT8 codes [out, in] and `weight_scale` fp32 [out], ModelOpt's int8_wo
    export (quant_utils `to_quantized_weight`: round(W / scale), clamped to [-128, 127]); the
    PyTorch backend's WeightOnlyQuantLinearMethod loads both as stored
    (tensorrt_llm/_torch/modules/linear.py);
  - TensorRT-LLM checkpoint: the weight in the checkpoint dtype. The build quantizes it itself
    (modeling_utils `preprocess_weights` -> convert_utils `weight_only_quantize_dict`, which
    quantizes every W8A16 weight that is not already int8 and adds `per_channel_scale`):
    cutlass_preprocessors.cpp's symmetric_quantize, scale = column amax / 128, codes
    round(W / scale) clamped to [-128, 127]. An int8 weight there would have to be in the
    GEMM's interleaved layout already, which only TensorRT-LLM's op produces, so builder never
    writes one; the engine path's W8A16 codes are TensorRT-LLM's nearest rounding, whatever
    `--rounding` chose for the HF export.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from builder.arch.plan import LayerPlan, ModelPlan
from builder.arch.tensors import (
    UNIT_NAMES,
    Role,
    hf_module,
    layer_units,
    trtllm_fp8_excludes,
    trtllm_module_templates,
)
from builder.errors import UserError

MIXED_PRECISION = "MIXED_PRECISION"
QUANT_CFG = "quant_cfg.json"  # TensorRT-LLM's per-layer file for MIXED_PRECISION


# unit names of the one-linear blocks' GEMMs
LINEAR_REPLACEMENTS = (UNIT_NAMES[Role.ATTN_LINEAR], UNIT_NAMES[Role.FFN_LINEAR])


class RecipeError(UserError):
    """A recipe that names an unknown module or format."""


class LinearFormat(enum.Enum):
    FP8 = "fp8"
    FP8_PC_PT = "fp8-pc-pt"
    W8A16 = "w8a16"
    BF16 = "bf16"

    @property
    def quant_algo(self) -> str | None:
        """The `quant_algo` string of both formats' configs (None: not quantized)."""
        return {
            "fp8": "FP8",
            "fp8-pc-pt": "FP8_PER_CHANNEL_PER_TOKEN",
            "w8a16": "W8A16",
            "bf16": None,
        }[self.value]

    @property
    def quantized(self) -> bool:
        return self is not LinearFormat.BF16

    @property
    def fp8(self) -> bool:
        """E4M3 weights, GEMMs on FP8 tensor cores (stored as codes in both checkpoints)."""
        return self in (LinearFormat.FP8, LinearFormat.FP8_PC_PT)

    @property
    def per_channel(self) -> bool:
        """One weight scale per output channel."""
        return self in (LinearFormat.FP8_PC_PT, LinearFormat.W8A16)

    @classmethod
    def parse(cls, value: str, where: str) -> LinearFormat:
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(f.value for f in cls)
            raise RecipeError(f"{where}: unknown format {value!r} (choose {choices})") from None

    @classmethod
    def from_algo(cls, algo: str | None, where: str) -> LinearFormat:
        for fmt in cls:
            if fmt.quant_algo == algo:
                return fmt
        raise RecipeError(f"{where}: quant_algo {algo!r} is not one builder runs")


# ---- units: the modules a format is assigned to -------------------------------------------------
@dataclass(frozen=True)
class Unit:
    """One GEMM of one block: its name, HF linears and TensorRT-LLM modules."""

    layer: int
    name: str  # qkv, o, gate_up, down, linear_attn, linear_mlp
    hf_modules: tuple[str, ...]
    trtllm_modules: tuple[str, ...]  # names with the stage-local index {j}

    @property
    def key(self) -> str:
        return unit_key(self.layer, self.name)


def unit_key(layer: int, name: str) -> str:
    return f"{layer}.{name}"


def unit_key_layer(key: str) -> int | None:
    """The block index of a unit key ("3.qkv" -> 3; None for a key that is not one)."""
    layer, _, _name = key.partition(".")
    return int(layer) if layer.isdigit() else None


def block_units(layer: LayerPlan) -> list[Unit]:
    """The units of one block, in execution order (empty for an empty block)."""
    return [
        Unit(
            layer.index,
            name,
            tuple(hf_module(r, layer.index) for r in roles),
            trtllm_module_templates(roles),
        )
        for name, roles in layer_units(layer)
    ]


def model_units(plan: ModelPlan) -> list[Unit]:
    return [u for layer in plan.layers for u in block_units(layer)]


# ---- the recipe ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Recipe:
    """A format for every unit: `default`, except where `overrides` (unit key -> format) says."""

    default: LinearFormat = LinearFormat.FP8
    overrides: Mapping[str, LinearFormat] = field(default_factory=dict)

    @classmethod
    def uniform(cls, fmt: LinearFormat) -> Recipe:
        return cls(fmt, {})

    def format_of(self, unit: Unit) -> LinearFormat:
        return self.overrides.get(unit.key, self.default)

    def hf_format(self, plan: ModelPlan, module: str) -> LinearFormat:
        return self.by_hf_module(plan)[module]

    def by_hf_module(self, plan: ModelPlan) -> dict[str, LinearFormat]:
        return {m: self.format_of(u) for u in model_units(plan) for m in u.hf_modules}

    def by_trtllm_module(self, plan: ModelPlan) -> dict[str, LinearFormat]:
        """{TensorRT-LLM module of the rank files (pp 1): format}."""
        return {
            m.format(j=u.layer): self.format_of(u)
            for u in model_units(plan)
            for m in u.trtllm_modules
        }

    def formats_used(self, plan: ModelPlan) -> set[LinearFormat]:
        return {self.format_of(u) for u in model_units(plan)}

    def quantized_formats(self, plan: ModelPlan) -> set[LinearFormat]:
        return {f for f in self.formats_used(plan) if f.quantized}

    def is_mixed(self, plan: ModelPlan) -> bool:
        """More than one format among the decoder linears (BF16 counts as one)."""
        return len(self.formats_used(plan)) > 1

    def validate(self, plan: ModelPlan, where: str = "recipe") -> None:
        units = [u.key for u in model_units(plan)]
        unknown = sorted(set(self.overrides) - set(units))
        if unknown:
            kinds = ", ".join(dict.fromkeys(key.split(".", 1)[1] for key in units))
            raise RecipeError(
                f"{where}: unit {unknown[0]!r} is not a linear of this model (units are "
                f"LAYER.KIND with KIND one of {kinds}: here {units[0]} ... {units[-1]}, "
                f"{len(units)} in all)"
            )

    def describe(self) -> str:
        if not self.overrides:
            return {
                LinearFormat.FP8: "FP8 per-tensor (E4M3), max calibration",
                LinearFormat.FP8_PC_PT: "FP8 per-channel weights, per-token activations (E4M3)",
                LinearFormat.W8A16: "INT8 per-channel weights, BF16 activations (weight-only)",
                LinearFormat.BF16: "unquantized",
            }[self.default]
        return f"mixed precision: {self.default.value} by default, {len(self.overrides)} overrides"

    def to_json(self) -> dict[str, Any]:
        return {
            "default": self.default.value,
            "overrides": {k: v.value for k, v in sorted(self.overrides.items(), key=_unit_order)},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str = "recipe") -> Recipe:
        if not isinstance(data, Mapping) or "default" not in data:
            raise RecipeError(f"{where}: expected {{'default': FORMAT, 'overrides': {{...}}}}")
        overrides = data.get("overrides") or {}
        if not isinstance(overrides, Mapping):
            raise RecipeError(f"{where}: overrides must map unit keys to formats")
        return cls(
            LinearFormat.parse(str(data["default"]), f"{where}: default"),
            {
                str(k): LinearFormat.parse(str(v), f"{where}: overrides.{k}")
                for k, v in overrides.items()
            },
        )

    @classmethod
    def load(cls, path: Path) -> Recipe:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise RecipeError(f"{path}: unreadable recipe ({err})") from None
        return cls.from_json(data.get("recipe", data), str(path))

    # ---- what the two formats' configs say ------------------------------------------------------
    def hf_quantization(self, plan: ModelPlan, kv_cache: bool, excluded: list[str]) -> dict:
        """hf_quant_config.json's `quantization` (ModelOpt's layout, see the module docstring)."""
        kv = "FP8" if kv_cache else None
        if not self.is_mixed(plan):
            algo = self.default.quant_algo if self.overrides == {} else _only(self, plan)
            return {"quant_algo": algo, "kv_cache_quant_algo": kv, "exclude_modules": excluded}
        layers = {
            m: {"quant_algo": self.format_of(u).quant_algo}
            for u in model_units(plan)
            if self.format_of(u).quantized
            for m in u.hf_modules
        }
        return {
            "quant_algo": MIXED_PRECISION,
            "kv_cache_quant_algo": kv,
            "quantized_layers": layers,
        }

    def trtllm_quantization(self, plan: ModelPlan, kv_cache: bool) -> dict[str, Any]:
        """config.json's `quantization` of the TensorRT-LLM checkpoint."""
        kv = "FP8" if kv_cache else None
        if self.is_mixed(plan):
            return {"quant_algo": MIXED_PRECISION, "kv_cache_quant_algo": kv}
        return {
            "quant_algo": _only(self, plan),
            "kv_cache_quant_algo": kv,
            "exclude_modules": trtllm_fp8_excludes(),
        }

    def check_trtllm(self, plan: ModelPlan) -> None:
        """Refuse what TensorRT-LLM's build cannot quantize: it rounds a W8A16 weight only
        when its name ends in qkv / dense / fc / proj / gate.weight (convert_utils
        `weight_only_quantize_dict`), which the one linear of a linear-replacement block
        (`attention.weight`, `mlp.weight`) does not."""
        for unit in model_units(plan):
            if self.format_of(unit) is LinearFormat.W8A16 and unit.name in LINEAR_REPLACEMENTS:
                raise RecipeError(
                    f"unit {unit.key}: w8a16 on a linear-replacement block cannot be built by "
                    "TensorRT-LLM (its W8A16 build quantizes qkv/dense/fc/proj/gate weights "
                    "only); give it another format or export --format hf"
                )

    def trtllm_layer_config(self, plan: ModelPlan, kv_cache: bool, pp: int) -> dict | None:
        """quant_cfg.json's content for MIXED_PRECISION (None when one format covers all).

        Module names carry the stage-local layer index, as the rank files do; with pp > 1
        two stages would share names, so a mixed recipe is refused there.
        """
        if not self.is_mixed(plan):
            return None
        if pp > 1:
            raise RecipeError(
                f"a mixed-precision recipe needs --pp 1 for the TensorRT-LLM export "
                f"(quant_cfg.json names layers by their stage-local index; pp is {pp})"
            )
        layers = {
            m: {"quant_algo": fmt.quant_algo}
            for m, fmt in self.by_trtllm_module(plan).items()
            if fmt.quantized
        }
        kv = "FP8" if kv_cache else None
        return {
            "quant_algo": MIXED_PRECISION,
            "kv_cache_quant_algo": kv,
            "quantized_layers": layers,
        }


def _only(recipe: Recipe, plan: ModelPlan) -> str | None:
    (fmt,) = recipe.formats_used(plan) or {recipe.default}
    return fmt.quant_algo


def _unit_order(item: tuple[str, Any]) -> tuple[int, str]:
    layer = unit_key_layer(item[0])
    return (-1 if layer is None else layer, item[0])


def read_trtllm_layer_formats(directory: Path, config: Mapping[str, Any]) -> dict[str, str | None]:
    """{trtllm module: quant_algo} from quant_cfg.json (MIXED_PRECISION only, else {})."""
    quant = config.get("quantization") or {}
    if quant.get("quant_algo") != MIXED_PRECISION:
        return {}
    path = Path(directory) / QUANT_CFG
    try:
        data = json.loads(path.read_text())
        layers = data["quantized_layers"]
        return {str(k): v.get("quant_algo") for k, v in layers.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise UserError(f"{path}: missing or unreadable for MIXED_PRECISION ({err})") from None


def trtllm_formats(
    directory: Path, config: Mapping[str, Any]
) -> tuple[LinearFormat, dict[str, LinearFormat]] | None:
    """(default format, {trtllm module: format}) a TensorRT-LLM config implies when it is
    per-channel or mixed (None for plain or per-tensor checkpoints)."""
    quant = config.get("quantization") or {}
    algo = quant.get("quant_algo")
    for fmt in (LinearFormat.FP8_PC_PT, LinearFormat.W8A16):
        if algo == fmt.quant_algo:
            return fmt, {}
    if algo != MIXED_PRECISION:
        return None
    layers = read_trtllm_layer_formats(directory, config)
    where = str(Path(directory) / QUANT_CFG)
    return LinearFormat.BF16, {
        m: LinearFormat.from_algo(a, f"{where}: {m}") for m, a in layers.items()
    }


def recipe_from_hf_quantization(
    plan: ModelPlan, quantization: Mapping[str, Any], where: str
) -> Recipe:
    """The recipe an hf_quant_config.json `quantization` section describes."""
    algo = quantization.get("quant_algo")
    if algo != MIXED_PRECISION:
        return Recipe.uniform(LinearFormat.from_algo(algo, where))
    layers = quantization.get("quantized_layers") or {}
    overrides = {}
    for unit in model_units(plan):
        algos = {(layers.get(m) or {}).get("quant_algo") for m in unit.hf_modules}
        if len(algos) != 1:
            raise RecipeError(f"{where}: the linears of {unit.key} have different formats {algos}")
        overrides[unit.key] = LinearFormat.from_algo(algos.pop(), f"{where}: {unit.key}")
    return Recipe(LinearFormat.BF16, overrides)


def linear_bytes(shape: tuple[int, int], fmt: LinearFormat, dtype_bytes: int = 2) -> int:
    """Stored bytes of one linear's weight and its scales in `fmt`."""
    out, inp = shape
    if fmt is LinearFormat.BF16:
        return out * inp * dtype_bytes
    if fmt.per_channel:
        return out * inp + 4 * out
    return out * inp + 8


def units_of_modules(plan: ModelPlan, modules: Iterable[str]) -> list[Unit]:
    wanted = set(modules)
    return [u for u in model_units(plan) if wanted & set(u.hf_modules)]

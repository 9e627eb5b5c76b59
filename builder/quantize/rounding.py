"""One stored rounding of every quantized linear, which the exports write.

With `--rounding gptq` the codes are not a function of the weight alone (they depend on the
calibration activations), so they are computed once, block by block during calibration
(builder.quantize.blockwise), and stored in the quantize work directory:

  .OUT.calib/rounding/layer-00003.fp8.safetensors        per-tensor FP8 codes of block 3
  .OUT.calib/rounding/layer-00003.fp8-pc-pt.safetensors  per-channel FP8 codes of block 3

each holding `<hf module>.weight` (float8_e4m3fn, or int8 for W8A16; the HF shape) and
`<hf module>.scale` (fp32; 0-dim per tensor, [out] per channel). The TensorRT-LLM export cuts
its rank slices from these codes, the unified HF export writes them whole, the block-streamed
sensitivity runs them: one grid, byte-identical FP8 codes in both checkpoints. (W8A16 codes go
to the HF export only: the TensorRT-LLM checkpoint stores W8A16 weights unquantized and the
build rounds them, builder.arch.formats.)

One grid means one per-tensor scale: TensorRT-LLM fuses q/k/v (and gate/up) and stores one
weight scale for the fused GEMM, the max of its members' (modelopt-fp8.md 6b), while the HF
export under nearest rounding writes each module's own amax / 448. Under GPTQ both write the
shared (max) scale: legal in the HF format, where each module simply stores the
`weight_scale` its codes were made with. Per-channel scales are per row in both already.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from builder.arch.formats import LinearFormat, Recipe, Unit, block_units
from builder.arch.plan import LayerPlan
from builder.arch.tensors import hf_layer_prefix, parse_hf_name
from builder.quantize.formats import format_scales, grid_of
from builder.quantize.fp8 import scale_from_amax
from builder.quantize.gptq import GptqOptions, HessianAccumulator, Rounding, gptq_rows

QUANTIZED = (LinearFormat.FP8, LinearFormat.FP8_PC_PT)


@dataclass(frozen=True)
class RoundingPlan:
    """What the calibration pass rounds: each unit's format under a fixed recipe, or every
    format in `formats` (--recipe auto: the sensitivity tries them all, the export takes the
    chosen one)."""

    options: GptqOptions = GptqOptions()
    recipe: Recipe | None = None
    formats: tuple[LinearFormat, ...] = QUANTIZED

    def formats_of(self, unit: Unit) -> list[LinearFormat]:
        if self.recipe is not None:
            fmt = self.recipe.format_of(unit)
            return [fmt] if fmt.quantized else []
        return [f for f in self.formats if f.quantized]

    def to_json(self) -> dict[str, Any]:
        return {
            "method": Rounding.GPTQ.value,
            **self.options.to_json(),
            "recipe": None if self.recipe is None else self.recipe.to_json(),
            "formats": [f.value for f in self.formats],
        }


def module_layer(module: str) -> int:
    return parse_hf_name(f"{module}.weight").layer


class RoundingStore:
    """The stored codes and scales, one safetensors file per block and format."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)

    def path(self, layer: int, fmt: LinearFormat) -> Path:
        return self.dir / f"layer-{layer:05d}.{fmt.value}.safetensors"

    def has(self, layer: int, fmt: LinearFormat) -> bool:
        return self.path(layer, fmt).is_file()

    def save(self, layer: int, fmt: LinearFormat, codes: Mapping[str, tuple[torch.Tensor, ...]]):
        """`codes`: hf module -> (E4M3 codes, fp32 scale); written atomically."""
        from safetensors.torch import save_file

        self.dir.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for module, (q, scale) in codes.items():
            tensors[f"{module}.weight"] = q.cpu().clone()
            tensors[f"{module}.scale"] = scale.float().cpu().clone()
        path = self.path(layer, fmt)
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), {"format": "pt", "rounding": Rounding.GPTQ.value})
        tmp.replace(path)

    def _open(self, module: str, fmt: LinearFormat):
        from safetensors import safe_open

        path = self.path(module_layer(module), fmt)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no stored rounding for {module} ({fmt.value})")
        return safe_open(str(path), framework="pt")

    def codes(self, module: str, fmt: LinearFormat, rows: slice | None = None) -> torch.Tensor:
        """The E4M3 codes of `module` (rows `rows`, else all)."""
        with self._open(module, fmt) as f:
            if rows is None:
                return f.get_tensor(f"{module}.weight")
            return f.get_slice(f"{module}.weight")[rows.start : rows.stop]

    def scale(self, module: str, fmt: LinearFormat) -> torch.Tensor:
        with self._open(module, fmt) as f:
            return f.get_tensor(f"{module}.scale")

    def shape(self, module: str, fmt: LinearFormat) -> list[int]:
        with self._open(module, fmt) as f:
            return list(f.get_slice(f"{module}.weight").get_shape())

    def digest(self) -> str:
        """Names and sizes of the stored files (a transform's fingerprint: codes made by
        another run are never taken for these)."""
        files = sorted(self.dir.glob("*.safetensors"))
        return json.dumps([[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files])


# ---- the calibration pass's part -----------------------------------------------------------------
def unit_scale(
    unit: Unit,
    weights: list[torch.Tensor],
    fmt: LinearFormat,
    weight_amax: Callable[[str], float],
) -> torch.Tensor:
    """The scale the exports write for `unit` (`weights`: its modules' weights, in order):
    per-tensor, amax / 448 of the max over the unit's modules (the fused GEMM's one scale);
    per-channel, each row's amax / 448 (/ 127 for W8A16), the rows stacked."""
    if fmt is LinearFormat.FP8:
        return scale_from_amax(max(weight_amax(m) for m in unit.hf_modules))
    return torch.cat([format_scales(fmt, w) for w in weights])


def reader_paths(layer: LayerPlan) -> dict[str, str]:
    """Unit key -> the block-relative path of a linear reading the unit's input (all of a
    unit's linears read the same tensor: one H per unit)."""
    prefix = hf_layer_prefix(layer.index)
    return {u.key: u.hf_modules[0].removeprefix(prefix) for u in block_units(layer)}


def register_hessians(
    block: torch.nn.Module, layer: LayerPlan, chunk: int, device: str
) -> tuple[dict[str, HessianAccumulator], list[Any]]:
    """Forward hooks accumulating each unit's H from the inputs its linears see; returns
    (unit key -> H, the hook handles to remove)."""
    hessians: dict[str, HessianAccumulator] = {}
    handles = []
    for key, path in reader_paths(layer).items():
        linear = block.get_submodule(path)
        hessians[key] = HessianAccumulator(linear.weight.shape[1], chunk, device)

        def hook(_module, inputs, _output, h=hessians[key]):
            h.add(inputs[0])

        handles.append(linear.register_forward_hook(hook))
    return hessians, handles


def round_block(
    block: torch.nn.Module,
    layer: LayerPlan,
    hessians: Mapping[str, HessianAccumulator],
    plan: RoundingPlan,
    weight_amax: Callable[[str], float],
    say: Callable[[str], None] | None = None,
) -> dict[LinearFormat, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """GPTQ codes of every unit of `block` in each format `plan` asks for: format -> hf
    module -> (codes, scale)."""
    prefix = hf_layer_prefix(layer.index)
    out: dict[LinearFormat, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    for unit in block_units(layer):
        formats = plan.formats_of(unit)
        if not formats:
            continue
        weights = [
            block.get_submodule(m.removeprefix(prefix)).weight.detach() for m in unit.hf_modules
        ]
        for fmt in formats:
            scale = unit_scale(unit, weights, fmt, weight_amax).to(weights[0].device)
            codes = gptq_rows(weights, hessians[unit.key], scale, plan.options, grid_of(fmt))
            row = 0
            for module, w, q in zip(unit.hf_modules, weights, codes, strict=True):
                rows = slice(row, row + w.shape[0])
                out.setdefault(fmt, {})[module] = (q, scale if scale.dim() == 0 else scale[rows])
                row += w.shape[0]
        if say:
            names = ", ".join(f.value for f in formats)
            say(f"block {layer.index}: {unit.name} rounded by GPTQ ({names})")
    return out


def stored_formats(plan: RoundingPlan, layer: LayerPlan) -> set[LinearFormat]:
    return {f for u in block_units(layer) for f in plan.formats_of(u)}


def missing_layers(
    store: RoundingStore, plan: RoundingPlan, layers: Iterable[LayerPlan]
) -> list[tuple[int, LinearFormat]]:
    return [
        (lay.index, f)
        for lay in layers
        for f in sorted(stored_formats(plan, lay), key=lambda f: f.value)
        if not store.has(lay.index, f)
    ]

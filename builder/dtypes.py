"""The one dtype table: each dtype's torch name, safetensors code and size, plus the FP8 range.

Torch-free at import (`builder plan` reads sizes without paying for torch); `torch_dtype`
imports it when a tensor dtype is actually needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# Largest finite E4M3 value: the saturation bound of every FP8 cast and the denominator of
# every FP8 scale (scale = amax / FP8_MAX).
FP8_MAX = 448.0


@dataclass(frozen=True)
class DType:
    name: str  # torch attribute and HF config `torch_dtype` spelling
    code: str  # safetensors header code
    itemsize: int
    floating: bool


TABLE: tuple[DType, ...] = (
    DType("float64", "F64", 8, True),
    DType("float32", "F32", 4, True),
    DType("bfloat16", "BF16", 2, True),
    DType("float16", "F16", 2, True),
    DType("float8_e4m3fn", "F8_E4M3", 1, True),
    DType("float8_e5m2", "F8_E5M2", 1, True),
    DType("int64", "I64", 8, False),
    DType("int32", "I32", 4, False),
    DType("int16", "I16", 2, False),
    DType("int8", "I8", 1, False),
    DType("uint8", "U8", 1, False),
    DType("bool", "BOOL", 1, False),
)
BY_NAME = {d.name: d for d in TABLE}
# Dtypes a model computes in and convert/quantize/verify accept for --dtype.
COMPUTE = ("bfloat16", "float16", "float32")
# Bytes per element by the names plans and profiles use ("fp8" is the profiles' word).
ITEM_BYTES = {**{d.name: d.itemsize for d in TABLE}, "fp8": 1}


def torch_dtype(name: str) -> torch.dtype:
    import torch

    return getattr(torch, BY_NAME[name].name)


def torch_dtypes(names: tuple[str, ...] = COMPUTE) -> dict[str, torch.dtype]:
    """name -> torch dtype for `names` (by default the compute dtypes)."""
    return {name: torch_dtype(name) for name in names}


def code_dtypes() -> dict[str, torch.dtype]:
    """safetensors code -> torch dtype, for every dtype in the table."""
    return {d.code: torch_dtype(d.name) for d in TABLE}

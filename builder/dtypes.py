"""The one dtype table: each element type's torch name, safetensors code, width and Inf/NaN
bits, plus the FP8 range. Torch-free: headers, layouts, byte slicing and the NaN/Inf scan
need only a type's code and width, so the BF16/FP32 paths (convert, check) and `builder plan`
never import torch.

A `Dtype` equals the torch dtype of the same name (`BF16 == torch.bfloat16`), so code that
holds either compares correctly; `dtype.torch` (or `torch_dtype(name)`) gives the torch dtype
where a tensor has to be made. A Dtype hashes by its name, not as the torch dtype does: keep
sets and dict keys of one kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch

# Largest finite E4M3 value: the saturation bound of every FP8 cast and the denominator of
# every FP8 scale (scale = amax / FP8_MAX).
FP8_MAX = 448.0


@dataclass(frozen=True, eq=False)
class Dtype:
    name: str  # torch attribute and HF config `torch_dtype` spelling
    code: str  # safetensors header code
    itemsize: int
    floating: bool
    exponent_mask: int = 0  # bits that are all ones exactly for Inf/NaN (floating types)

    @property
    def torch(self) -> Any:
        import torch

        return getattr(torch, self.name)

    @property
    def bits(self) -> np.dtype:
        """The unsigned integer type of the same width (for bit-level checks and copies)."""
        import numpy as np

        return np.dtype(f"<u{self.itemsize}")

    @property
    def is_floating_point(self) -> bool:
        return self.floating

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Dtype):
            return self.name == other.name
        return _torch_name(other) == self.name

    def __hash__(self) -> int:
        return hash(self.name)

    def __str__(self) -> str:
        return f"torch.{self.name}"  # messages read as they did when torch dtypes were used

    def __repr__(self) -> str:
        return f"Dtype({self.name})"

    def __reduce__(self):
        return by_name, (self.name,)


F64 = Dtype("float64", "F64", 8, True, 0x7FF0_0000_0000_0000)
F32 = Dtype("float32", "F32", 4, True, 0x7F80_0000)
BF16 = Dtype("bfloat16", "BF16", 2, True, 0x7F80)
F16 = Dtype("float16", "F16", 2, True, 0x7C00)
F8_E4M3 = Dtype("float8_e4m3fn", "F8_E4M3", 1, True, 0x7F)  # no Inf; NaN is S.1111.111
F8_E5M2 = Dtype("float8_e5m2", "F8_E5M2", 1, True, 0x7C)
I64 = Dtype("int64", "I64", 8, False)
I32 = Dtype("int32", "I32", 4, False)
I16 = Dtype("int16", "I16", 2, False)
I8 = Dtype("int8", "I8", 1, False)
U8 = Dtype("uint8", "U8", 1, False)
BOOL = Dtype("bool", "BOOL", 1, False)

TABLE: tuple[Dtype, ...] = (F64, F32, BF16, F16, F8_E4M3, F8_E5M2, I64, I32, I16, I8, U8, BOOL)
BY_CODE = {d.code: d for d in TABLE}
BY_NAME = {d.name: d for d in TABLE}
# Dtypes a model computes in and convert/quantize/verify accept for --dtype.
COMPUTE = ("bfloat16", "float16", "float32")
# Bytes per element by the names plans and profiles use ("fp8" is the profiles' word).
ITEM_BYTES = {**{d.name: d.itemsize for d in TABLE}, "fp8": 1}


def _torch_name(value: object) -> str | None:
    text = str(value)
    return text.removeprefix("torch.") if text.startswith("torch.") else None


def by_name(name: str) -> Dtype:
    return BY_NAME[name]


def dtype_of(value: Dtype | str | Any) -> Dtype:
    """The Dtype of a Dtype, a torch dtype, or a name ("bfloat16", "torch.bfloat16")."""
    if isinstance(value, Dtype):
        return value
    name = _torch_name(value) or str(value)
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"dtype {value} has no safetensors code") from None


def torch_dtype(name: str) -> torch.dtype:
    return BY_NAME[name].torch


def torch_dtypes(names: tuple[str, ...] = COMPUTE) -> dict[str, torch.dtype]:
    """name -> torch dtype for `names` (by default the compute dtypes)."""
    return {name: torch_dtype(name) for name in names}


def code_dtypes() -> dict[str, torch.dtype]:
    """safetensors code -> torch dtype, for every dtype in the table."""
    return {d.code: d.torch for d in TABLE}

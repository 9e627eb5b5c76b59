"""Scanning safetensors files for NaN/Inf, tensor by tensor, in bounded memory.

Each tensor is mapped in blocks of at most CHUNK_BYTES (unmapped at once), and a value is
NaN or Inf exactly when its exponent bits are all ones: one AND and one max per block with
numpy, no float conversion and no tensor library. Integer tensors cannot hold non-finite
values and are skipped; E4M3 has a NaN encoding and no Inf.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from builder.dtypes import BY_CODE, Dtype
from builder.errors import UserError
from builder.io.safetensors_stream import map_range, read_header

CHUNK_BYTES = 64 << 20
FLOAT_CODES = {code for code, dtype in BY_CODE.items() if dtype.floating}

# (tensor name, bytes scanned) after each tensor
OnTensor = Callable[[str, int], None]


def _entries(path: Path) -> tuple[int, dict[str, tuple[Dtype, int, int]]]:
    """(data start, {name: (dtype, begin, end)}) of a safetensors file."""
    start, header = read_header(Path(path))
    entries = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        code = entry.get("dtype")
        if code not in BY_CODE:
            raise UserError(f"{path}: tensor {name!r} has unsupported dtype {code}")
        begin, end = entry["data_offsets"]
        entries[name] = (BY_CODE[code], begin, end)
    return start, entries


def _blocks(fd: int, begin: int, end: int, itemsize: int, chunk_bytes: int) -> Iterator[memoryview]:
    """The bytes begin..end of `fd` as short-lived mappings of at most ~chunk_bytes, cut at
    element boundaries."""
    step = max(itemsize, chunk_bytes - chunk_bytes % itemsize)
    for first in range(begin, end, step):
        last = min(first + step, end)
        mm, at = map_range(fd, first, last - first)
        with mm:
            view = memoryview(mm)[at : at + last - first]
            try:
                yield view
            finally:
                view.release()


def count_nonfinite(data: np.ndarray, dtype: Dtype, scratch: np.ndarray) -> int:
    """NaN/Inf elements in raw bytes `data` of float type `dtype` (`scratch`: a reused buffer
    of at least len(data) bytes)."""
    bits = data.view(dtype.bits)
    if not bits.size:
        return 0
    mask = dtype.bits.type(dtype.exponent_mask)
    negative = dtype.bits.type(dtype.exponent_mask | (1 << (8 * dtype.itemsize - 1)))
    if data.view(f"<i{dtype.itemsize}").max() < mask and bits.max() < negative:
        return 0  # (see builder.convert.sources.first_nonfinite: two read-only maxima)
    exponents = np.bitwise_and(bits, mask, out=scratch[: data.size].view(dtype.bits))
    return int(np.count_nonzero(exponents == mask))


def nonfinite_tensors(
    path: str | Path,
    names: Iterable[str] | None = None,
    on_tensor: OnTensor | None = None,
    chunk_bytes: int = CHUNK_BYTES,
) -> dict[str, int]:
    """{tensor name: number of NaN/Inf values} for every floating tensor of `path` that has any."""
    start, entries = _entries(Path(path))
    bad: dict[str, int] = {}
    scratch = np.empty(0, dtype=np.uint8)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        for name in list(names) if names is not None else list(entries):
            dtype, begin, end = entries[name]
            if dtype.floating and end > begin:
                if scratch.size < min(end - begin, chunk_bytes + dtype.itemsize):
                    scratch = np.empty(min(end - begin, chunk_bytes + dtype.itemsize), np.uint8)
                count = 0
                for view in _blocks(fd, start + begin, start + end, dtype.itemsize, chunk_bytes):
                    data = np.frombuffer(view, dtype=np.uint8)
                    count += count_nonfinite(data, dtype, scratch)
                    del data  # no view may outlive the mapping
                if count:
                    bad[name] = count
            if on_tensor:
                on_tensor(name, end - begin)
    finally:
        os.close(fd)
    return bad


def tensor_values(path: str | Path, name: str) -> list[float]:
    """A small float tensor's values (scales), read from the file's bytes."""
    start, entries = _entries(Path(path))
    dtype, begin, end = entries[name]
    with open(path, "rb") as handle:
        handle.seek(start + begin)
        raw = handle.read(end - begin)
    return decode_floats(raw, dtype)


def decode_floats(raw: bytes, dtype: Dtype) -> list[float]:
    bits = np.frombuffer(raw, dtype=dtype.bits)
    if dtype.code == "BF16":
        return (bits.astype(np.uint32) << 16).view(np.float32).astype(float).tolist()
    native = {"F16": np.float16, "F32": np.float32, "F64": np.float64}.get(dtype.code)
    if native is None:
        raise UserError(f"a scale of dtype {dtype.code} is not supported")
    return bits.view(native).astype(float).tolist()


def scale_problems(path: str | Path, names: Iterable[str]) -> list[str]:
    """Each named scale tensor must be finite and positive (a zero or negative scale turns
    every FP8 value of its tensor into garbage)."""
    problems = []
    for name in names:
        values = tensor_values(path, name)
        if not all(np.isfinite(values)):
            problems.append(f"{path}: scale {name!r} is not finite ({values[:4]})")
        elif not values or min(values) <= 0:
            problems.append(f"{path}: scale {name!r} is not positive ({values[:4]})")
    return problems

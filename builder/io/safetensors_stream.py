"""Safetensors files written progressively, with the header fixed before the first data byte.

The safetensors format is an 8-byte little-endian header length, a JSON header
(`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, offsets
relative to the data buffer) and the data buffer. Because every tensor's name, dtype and shape
is known from the plan before any weight is read, the header can be written first and the
data appended in order as it is produced: the writer never holds more than the block it is
given. The sha256 of the file is computed on the fly, so a manifest costs no second read.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import torch

from builder.errors import UserError

# safetensors dtype codes; the reader side lives in builder.io.checkpoint.SAFETENSORS_DTYPES.
DTYPE_CODES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
_HEADER_ALIGN = 8  # safetensors' own writer pads the header so the data buffer is 8-aligned
_MAX_WRITE = 1 << 30  # Linux caps one write() at ~2 GiB; stay well below
_OVERLAP_MIN = 1 << 20  # below this a hashing thread costs more than it saves


class SafetensorsWriteError(UserError):
    """A rank file that could not be written (disk full, permissions, wrong tensor order)."""


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a file to be written: everything the header needs."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * dtype_size(self.dtype)

    @property
    def code(self) -> str:
        try:
            return DTYPE_CODES[self.dtype]
        except KeyError:
            raise SafetensorsWriteError(
                f"{self.name}: dtype {self.dtype} has no safetensors code"
            ) from None


def dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def encode_header(specs: Sequence[TensorSpec], metadata: Mapping[str, str] | None = None) -> bytes:
    """Length prefix + JSON header for `specs` stored back to back in the given order."""
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise SafetensorsWriteError(f"tensor {dup!r} appears twice in one file")
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for spec in specs:
        header[spec.name] = {
            "dtype": spec.code,
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(len(text) + 8) % _HEADER_ALIGN)
    return struct.pack("<Q", len(text)) + text


def file_size(specs: Sequence[TensorSpec], metadata: Mapping[str, str] | None = None) -> int:
    """Exact size of the file `SafetensorsStreamWriter` writes for `specs`."""
    return len(encode_header(specs, metadata)) + sum(s.nbytes for s in specs)


def read_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(start of the data buffer, parsed JSON header) of a safetensors file."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(8)
            if len(raw) != 8:
                raise UserError(f"{path}: truncated safetensors file (no header)")
            (length,) = struct.unpack("<Q", raw)
            if length > 100 * (1 << 20):
                raise UserError(f"{path}: header length {length} is not plausible")
            text = handle.read(length)
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err})") from None
    if len(text) != length:
        raise UserError(f"{path}: truncated safetensors header")
    try:
        header = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: corrupt safetensors header ({err})") from None
    return 8 + length, header


def header_specs(header: Mapping[str, Any]) -> list[TensorSpec]:
    """TensorSpecs of a parsed header in data order (unknown dtype codes raise)."""
    entries = sorted(
        ((k, v) for k, v in header.items() if k != "__metadata__"),
        key=lambda kv: kv[1]["data_offsets"][0],
    )
    specs = []
    for name, entry in entries:
        if entry["dtype"] not in CODE_DTYPES:
            raise UserError(f"tensor {name!r} has unsupported dtype {entry['dtype']}")
        specs.append(TensorSpec(name, tuple(entry["shape"]), CODE_DTYPES[entry["dtype"]]))
    return specs


def as_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes in C order, without a copy when it is already contiguous."""
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.dtype is torch.bool:
        flat = flat.view(torch.uint8)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


@dataclass(frozen=True)
class FileSpan:
    """Bytes that already sit in another file (`fd` at `offset`), also mapped as `view`.

    The writer copies them in the kernel with copy_file_range, as `cp` does, and hashes
    `view`; the bytes never pass through a user-space buffer.
    """

    fd: int
    offset: int
    view: memoryview

    def __len__(self) -> int:
        return len(self.view)


@dataclass(frozen=True)
class WrittenFile:
    path: Path
    size: int
    sha256: str
    tensors: int


class SafetensorsStreamWriter:
    """Writes one safetensors file whose tensors are known up front, data appended in order.

    Usage: `with SafetensorsStreamWriter(path, specs) as w: w.write(name, tensor)` (whole
    tensors) or `w.start(name); w.append(block)...; w.finish()` (row blocks, raw bytes).
    Leaving the block with an exception deletes the file; `result` holds size and sha256.
    """

    def __init__(
        self,
        path: str | Path,
        specs: Sequence[TensorSpec],
        metadata: Mapping[str, str] | None = None,
    ):
        self.path = Path(path)
        self.specs = list(specs)
        self._header = encode_header(self.specs, metadata)
        self._next = 0  # index of the next spec to start
        self._current: TensorSpec | None = None
        self._left = 0  # bytes still owed to the current tensor
        self._digest = hashlib.sha256()
        self._written = 0
        self._fd: int | None = None
        self._hasher: ThreadPoolExecutor | None = None
        self.result: WrittenFile | None = None

    @property
    def expected_size(self) -> int:
        return len(self._header) + sum(s.nbytes for s in self.specs)

    # ---- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> Self:
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as err:
            raise SafetensorsWriteError(f"{self.path}: cannot create ({err.strerror})") from None
        self._emit(memoryview(self._header))
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self._close()
            return
        self._abandon()

    def _close(self) -> None:
        if self._current is not None or self._next != len(self.specs):
            missing = self._current.name if self._current else self.specs[self._next].name
            self._abandon()
            raise SafetensorsWriteError(
                f"{self.path}: closed before tensor {missing!r} was written"
            )
        self._stop_hasher()
        os.close(self._fd)
        self._fd = None
        self.result = WrittenFile(
            self.path, self._written, self._digest.hexdigest(), len(self.specs)
        )

    def _stop_hasher(self) -> None:
        if self._hasher is not None:
            self._hasher.shutdown(wait=True)
            self._hasher = None

    def _abandon(self) -> None:
        self._stop_hasher()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.path.unlink(missing_ok=True)

    # ---- data ------------------------------------------------------------------------------
    @contextmanager
    def _hashing(self, data: memoryview):
        """Hash `data` in a helper thread while the caller writes it: both release the GIL,
        so sha256 (the largest CPU cost) overlaps the kernel copy instead of adding to it."""
        if len(data) < _OVERLAP_MIN:
            self._digest.update(data)
            yield
            return
        if self._hasher is None:
            self._hasher = ThreadPoolExecutor(1, thread_name_prefix="sha256")
        pending = self._hasher.submit(self._digest.update, data)
        try:
            yield
        finally:
            pending.result()  # the digest sees blocks in order; `data` stays valid until here

    def _emit(self, data: memoryview) -> None:
        with self._hashing(data):
            self._emit_tail(data)

    def _emit_span(self, span: FileSpan) -> None:
        with self._hashing(span.view):
            self._copy_piece(span.fd, span.offset, span.view)

    def _copy_piece(self, fd: int, offset: int, data: memoryview) -> None:
        done = 0
        while done < len(data):
            try:
                copied = os.copy_file_range(
                    fd, self._fd, min(len(data) - done, _MAX_WRITE), offset + done
                )
            except OSError as err:
                if err.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                    raise self._failure(done, err) from err
                copied = 0
            if copied == 0:  # not supported here (or source shorter than its header says)
                self._written += done
                self._emit_tail(data[done:])
                return
            done += copied
        self._written += len(data)

    def _emit_tail(self, data: memoryview) -> None:
        done = 0
        while done < len(data):
            try:
                done += os.write(self._fd, data[done : done + _MAX_WRITE])
            except OSError as err:
                raise self._failure(done, err) from err
        self._written += len(data)

    def _failure(self, done: int, err: OSError) -> SafetensorsWriteError:
        return SafetensorsWriteError(
            f"{self.path}: write failed after {self._written + done:,} bytes "
            f"({err.strerror or err})"
        )

    def start(self, name: str) -> TensorSpec:
        """Begin the next tensor; its name must be the next one in the header."""
        if self._current is not None:
            raise SafetensorsWriteError(f"{self.path}: {self._current.name!r} is not finished")
        if self._next >= len(self.specs):
            raise SafetensorsWriteError(f"{self.path}: tensor {name!r} is not in the header")
        spec = self.specs[self._next]
        if spec.name != name:
            raise SafetensorsWriteError(
                f"{self.path}: got tensor {name!r} but the header's next tensor is {spec.name!r}"
            )
        self._current, self._left = spec, spec.nbytes
        self._next += 1
        return spec

    def append(self, data: memoryview | bytes | torch.Tensor | FileSpan) -> None:
        """Append bytes (a tensor's bytes, which must have the header's dtype, or a FileSpan)."""
        spec = self._current
        if spec is None:
            raise SafetensorsWriteError(f"{self.path}: append() outside start()/finish()")
        if isinstance(data, FileSpan):
            if len(data) > self._left:
                raise SafetensorsWriteError(
                    f"{self.path}: {spec.name}: {len(data) - self._left} bytes more than its "
                    "shape holds"
                )
            self._emit_span(data)
            self._left -= len(data)
            return
        if isinstance(data, torch.Tensor):
            if data.dtype != spec.dtype:
                raise SafetensorsWriteError(
                    f"{self.path}: {spec.name}: got {data.dtype}, header says {spec.dtype}"
                )
            data = as_bytes(data)
        view = memoryview(data).cast("B")
        if len(view) > self._left:
            raise SafetensorsWriteError(
                f"{self.path}: {spec.name}: {len(view) - self._left} bytes more than its shape "
                "holds"
            )
        self._emit(view)
        self._left -= len(view)

    def finish(self) -> None:
        spec = self._current
        if spec is None:
            raise SafetensorsWriteError(f"{self.path}: finish() without start()")
        if self._left:
            raise SafetensorsWriteError(f"{self.path}: {spec.name}: {self._left} bytes short")
        self._current = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write one whole tensor; its shape and dtype must match the header."""
        spec = self.start(name)
        if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise SafetensorsWriteError(
                f"{self.path}: {name}: got {tuple(tensor.shape)} {tensor.dtype}, "
                f"header says {spec.shape} {spec.dtype}"
            )
        self.append(tensor)
        self.finish()

    def write_blocks(
        self, name: str, blocks: Iterable[memoryview | torch.Tensor | FileSpan]
    ) -> None:
        self.start(name)
        for block in blocks:
            self.append(block)
        self.finish()

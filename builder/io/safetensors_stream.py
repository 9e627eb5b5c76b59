"""Safetensors files written progressively, with the header fixed before the first data byte.

The safetensors format is an 8-byte little-endian header length, a JSON header
(`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, offsets
relative to the data buffer) and the data buffer. Because every tensor's name, dtype and shape
is known from the plan before any weight is read, the header can be written first and the
data appended in order as it is produced: the writer never holds more than the block it is
given. The file's digest (builder.io.manifest.DIGEST) is computed on the fly, so a manifest
costs no second read.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import math
import mmap
import os
import struct
import sys
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import numpy as np

from builder.dtypes import BY_CODE, Dtype, dtype_of
from builder.errors import UserError
from builder.io.manifest import new_hasher

_HEADER_ALIGN = 8  # safetensors' own writer pads the header so the data buffer is 8-aligned
_MAX_WRITE = 1 << 30  # Linux caps one write() at ~2 GiB; stay well below
_OVERLAP_MIN = 1 << 20  # below this a hashing thread costs more than it saves
_HASH_LAG = 128 << 20  # source bytes whose hash may trail their copy (mapped, so in RSS)
# Written bytes after which the writer asks the kernel to start putting them on disk.
_WRITEBACK_BYTES = 32 << 20
_SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h: start write-out of the range's dirty pages, no wait
# Up to this size a FileSpan is hashed and written by the caller: its bytes are in the CPU
# cache, and write() from there costs less than copy_file_range re-reading them from memory.
_INLINE_SPAN = 4 << 20


class SafetensorsWriteError(UserError):
    """A rank file that could not be written (disk full, permissions, wrong tensor order)."""


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a file to be written: everything the header needs.

    `dtype` may be given as a torch dtype or a name; it is kept as a `Dtype`.
    """

    name: str
    shape: tuple[int, ...]
    dtype: Dtype

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "dtype", dtype_of(self.dtype))
        except KeyError:
            raise SafetensorsWriteError(
                f"{self.name}: dtype {self.dtype} has no safetensors code"
            ) from None
        object.__setattr__(self, "shape", tuple(self.shape))

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def code(self) -> str:
        return self.dtype.code


def dtype_size(dtype: Any) -> int:
    return dtype_of(dtype).itemsize


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
        if entry["dtype"] not in BY_CODE:
            raise UserError(f"tensor {name!r} has unsupported dtype {entry['dtype']}")
        specs.append(TensorSpec(name, tuple(entry["shape"]), BY_CODE[entry["dtype"]]))
    return specs


def is_torch_tensor(value: Any) -> bool:
    """True for a torch.Tensor, without importing torch (a caller that has none has none)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def as_bytes(tensor: Any) -> memoryview:
    """The bytes of a torch tensor, numpy array or buffer in C order, without a copy when it
    is already contiguous."""
    if is_torch_tensor(tensor):
        import torch

        flat = tensor.detach().contiguous().reshape(-1)
        if flat.dtype is torch.bool:
            flat = flat.view(torch.uint8)
        return memoryview(flat.view(torch.uint8).numpy()).cast("B")
    if isinstance(tensor, np.ndarray):
        return memoryview(np.ascontiguousarray(tensor).reshape(-1).view(np.uint8))
    return memoryview(tensor).cast("B")


@functools.cache
def _sync_file_range():
    """libc's sync_file_range (Linux), or None where there is none."""
    try:
        call = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError, TypeError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    return call


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing bytes offset..offset+length of `fd` to disk without waiting for them.

    A rank file is GBs of fresh dirty pages; left alone, the kernel writes them back only
    when they pile up past its dirty limits (and then throttles every writer) or at the
    final fsync. Started as they are written, the disk works while the CPU converts: the
    bytes are durable sooner and the dirty set stays small (measured here on 2 GB: write
    plus fsync 0.45-0.55 s instead of 0.62-0.78 s). Best effort: nothing where unsupported.
    """
    call = _sync_file_range()
    if call is not None:
        call(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def map_range(fd: int, begin: int, length: int) -> tuple[mmap.mmap, int]:
    """A read-only mapping holding bytes begin..begin+length of `fd`, and where `begin` lies in
    it (a mapping must start at a multiple of the allocation granularity)."""
    aligned = begin - begin % mmap.ALLOCATIONGRANULARITY
    mm = mmap.mmap(fd, length + begin - aligned, offset=aligned, access=mmap.ACCESS_READ)
    return mm, begin - aligned


@dataclass(frozen=True)
class FileSpan:
    """Bytes that already sit in another file (`fd` at `offset`), also mapped as `view`.

    The bytes never pass through a user-space buffer: a cache-sized span is hashed and
    written straight from `view`; a large one is copied in the kernel with copy_file_range,
    as `cp` does, while a helper thread hashes `view`.
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
    digest: str  # builder.io.manifest.DIGEST of the whole file
    tensors: int


class SafetensorsStreamWriter:
    """Writes one safetensors file whose tensors are known up front, data appended in order.

    Usage: `with SafetensorsStreamWriter(path, specs) as w: w.write(name, tensor)` (whole
    tensors) or `w.start(name); w.append(block)...; w.finish()` (row blocks, raw bytes).
    Leaving the block with an exception deletes the file; `result` holds size and digest.
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
        self._digest = new_hasher()
        self._written = 0
        self._flushed = 0  # bytes whose writeback has been started
        self._fd: int | None = None
        self._hasher: ThreadPoolExecutor | None = None
        self._lagging: deque[tuple[Future, int]] = deque()  # span hashes not yet waited for
        self._lag = 0
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
        for pending, _ in self._lagging:
            pending.result()  # (raises what the hasher raised)
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
        so hashing (the largest CPU cost) overlaps the kernel copy instead of adding to it.
        The caller may reuse `data`'s buffer afterwards, so this waits for its hash."""
        if len(data) < _OVERLAP_MIN and not self._lagging:
            self._digest.update(data)
            yield
            return
        pending = self._hash_later(data)
        try:
            yield
        finally:
            pending.result()  # the digest sees blocks in order; `data` stays valid until here
            self._lagging.clear()  # (and so has every block queued before it)
            self._lag = 0

    def _hash_later(self, data: memoryview) -> Future:
        if self._hasher is None:
            self._hasher = ThreadPoolExecutor(1, thread_name_prefix="digest")
        return self._hasher.submit(self._digest.update, data)

    def _emit(self, data: memoryview) -> None:
        with self._hashing(data):
            self._emit_tail(data)

    def _emit_span(self, span: FileSpan) -> None:
        """A small span (the reader's, cache-sized) is hashed and written here and now, from
        the cache its check just filled. A large one is copied in the kernel while the
        helper thread hashes it, lagging by up to _HASH_LAG bytes. The span's bytes are a
        mapping of the source, which stays valid (and unchanged) while the hasher holds its
        own view of it: the reader's unmap is deferred until that view is released."""
        if len(span) <= _INLINE_SPAN and not self._lagging:
            self._digest.update(span.view)
            self._emit_tail(span.view)
            return
        view, size = memoryview(span.view), len(span.view)
        self._lagging.append((self._hash_later_and_release(view), size))
        self._lag += size
        self._copy_piece(span.fd, span.offset, span.view)
        while self._lag > _HASH_LAG:
            pending, size = self._lagging.popleft()
            pending.result()
            self._lag -= size

    def _hash_later_and_release(self, view: memoryview) -> Future:
        def update() -> None:
            try:
                self._digest.update(view)
            finally:
                view.release()

        if self._hasher is None:
            self._hasher = ThreadPoolExecutor(1, thread_name_prefix="digest")
        return self._hasher.submit(update)

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
        self._writeback()

    def _emit_tail(self, data: memoryview) -> None:
        done = 0
        while done < len(data):
            try:
                done += os.write(self._fd, data[done : done + _MAX_WRITE])
            except OSError as err:
                raise self._failure(done, err) from err
        self._written += len(data)
        self._writeback()

    def _writeback(self) -> None:
        if self._written - self._flushed >= _WRITEBACK_BYTES:
            start_writeback(self._fd, self._flushed, self._written - self._flushed)
            self._flushed = self._written

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

    def append(self, data: memoryview | bytes | np.ndarray | Any | FileSpan) -> None:
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
        if is_torch_tensor(data) and spec.dtype != data.dtype:
            raise SafetensorsWriteError(
                f"{self.path}: {spec.name}: got {data.dtype}, header says {spec.dtype}"
            )
        view = as_bytes(data)
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

    def write(self, name: str, tensor: Any) -> None:
        """Write one whole tensor (torch); its shape and dtype must match the header."""
        spec = self.start(name)
        if tuple(tensor.shape) != spec.shape or spec.dtype != tensor.dtype:
            raise SafetensorsWriteError(
                f"{self.path}: {name}: got {tuple(tensor.shape)} {tensor.dtype}, "
                f"header says {spec.shape} {spec.dtype}"
            )
        self.append(tensor)
        self.finish()

    def write_blocks(
        self, name: str, blocks: Iterable[memoryview | np.ndarray | Any | FileSpan]
    ) -> None:
        self.start(name)
        for block in blocks:
            self.append(block)
        self.finish()

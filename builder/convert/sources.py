"""What each rank tensor reads from the HF checkpoint, and reading it in bounded blocks.

A rank tensor is the concatenation along dim 0 of a few *pieces* (a row range and maybe a
column range of one HF tensor) plus zero rows (vocabulary padding). `read_plan` derives the
pieces from the same index helpers as the pure split rules; `SourceReader.blocks` streams
them as row blocks of at most `block_bytes`, so no step holds a whole tensor. Same-dtype row
ranges that need no change are read (preadv) into a reused cache-sized buffer, then
checked, hashed and written while their bytes are in the CPU cache; column ranges are one
strided numpy copy out of an mmap of just those rows into an equally cache-sized buffer.
All of that is byte slicing: a conversion that keeps the dtype imports no tensor library
(the NaN/Inf scan tests exponent bits with numpy). Only a dtype change (torch casts, with
range checks) and pickle checkpoints, which have no offsets
(`HFCheckpoint.read(rows=..., cols=...)`), import torch. Offsets come from
`HFCheckpoint.data_location` (the safetensors header).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import numpy as np

from builder.arch.plan import ModelPlan
from builder.arch.tensors import RankTensor, Split, hf_layer_of, hf_tensor_shapes
from builder.convert.split import chunk, head_rows, kv_heads_of_rank, vocab_rows
from builder.dtypes import BF16, BY_NAME, F16, F32, F64, Dtype, dtype_of
from builder.errors import UserError
from builder.io.checkpoint import INDEX_NAME, CheckpointError, HFCheckpoint
from builder.io.safetensors_stream import as_bytes, is_torch_tensor, map_range

DEFAULT_BLOCK_BYTES = 64 << 20
# One block of bytes that go out unchanged: read (preadv) into a reused buffer small enough
# to stay in a core's L2 cache through the NaN/Inf check, the hash and the write, large
# enough that the per-block Python overhead stays small. Measured here per GB: 0.37 s of CPU
# in 256 KiB..1 MiB blocks against 0.50 s for check, copy_file_range and hash each over
# 64 MiB mappings; and read into a buffer 0.45-0.48 s wall against 0.55-0.58 s for the same
# blocks taken from an mmap (page-table work: faults and unmaps).
SPAN_BYTES = 512 << 10
FLOAT_DTYPES = (F32, BF16, F16, F64)


class UnrepresentableWeight(UserError):
    """A finite source weight that the output dtype turns into Inf or zero."""


class NonFiniteWeight(UserError):
    """A weight holding NaN or Inf."""


@dataclass(frozen=True)
class Piece:
    """Rows `rows` (and columns `cols`, or all) of HF tensor `source`."""

    source: str
    rows: slice | None  # None: a 1-D tensor, read whole
    cols: slice | None = None


@dataclass(frozen=True)
class ReadPlan:
    item: RankTensor
    pieces: tuple[Piece, ...]
    pad_rows: int = 0


def read_plan(plan: ModelPlan, item: RankTensor, tp: int, tp_rank: int) -> ReadPlan:
    """The pieces of HF tensors that make up `item` on TP rank `tp_rank`, in order."""
    rule, layer = item.rule, item.layer
    names = rule.source_names(layer.index if layer else None)
    if len(item.shape) == 1:
        return ReadPlan(item, (Piece(names[0], None),))
    if rule.split is Split.REPLICATED:
        return ReadPlan(item, (Piece(names[0], slice(0, item.shape[0])),))
    if rule.split is Split.COLUMN:
        rows = chunk(item.shape[0] * tp, tp, tp_rank, f"{names[0]} rows")
        return ReadPlan(item, (Piece(names[0], rows),))
    if rule.split is Split.ROW:
        cols = chunk(item.shape[1] * tp, tp, tp_rank, f"{names[0]} columns")
        return ReadPlan(item, (Piece(names[0], slice(0, item.shape[0]), cols),))
    if rule.split is Split.VOCAB:
        rows, pad = vocab_rows(plan.vocab_size, tp, tp_rank)
        pieces = (Piece(names[0], rows),) if rows.stop > rows.start else ()
        return ReadPlan(item, pieces, pad)
    if rule.split is Split.QKV:
        hd = plan.head_dim
        q_rows = head_rows(chunk(plan.num_attention_heads, tp, tp_rank, "attention heads"), hd)
        kv_rows = head_rows(kv_heads_of_rank(layer.kv_heads, tp, tp_rank), hd)
        q, k, v = names
        return ReadPlan(item, (Piece(q, q_rows), Piece(k, kv_rows), Piece(v, kv_rows)))
    raise AssertionError(rule.split)


# ---- validation -------------------------------------------------------------------------------
def source_problems(ckpt: HFCheckpoint, plan: ModelPlan) -> list[str]:
    """Every disagreement between the checkpoint's tensors and what the plan needs."""
    expected = hf_tensor_shapes(plan)
    want_dtype = BY_NAME.get(plan.torch_dtype)
    problems = []
    for name, shape in expected.items():
        if name not in ckpt:
            problems.append(f"tensor {name!r} {_owner(name)} is missing from the checkpoint")
            continue
        info = ckpt.info(name)
        if info.shape != shape:
            problems.append(
                f"tensor {name!r} in {info.file.name} has shape {list(info.shape)} but the config "
                f"implies {list(shape)}"
            )
        if info.dtype not in FLOAT_DTYPES:
            problems.append(f"tensor {name!r} in {info.file.name} has non-float dtype {info.dtype}")
        elif want_dtype is not None and info.dtype != want_dtype:
            problems.append(
                f"tensor {name!r} in {info.file.name} is {info.dtype} but config.json says "
                f"torch_dtype {plan.torch_dtype}"
            )
    for name in ckpt.names():
        if name not in expected:
            problems.append(
                f"tensor {name!r} in {ckpt.info(name).file.name} is not used by the plan "
                f"{_owner(name)}"
            )
    return problems


def _owner(name: str) -> str:
    layer = hf_layer_of(name)
    return "(model-level)" if layer is None else f"(layer {layer})"


def check_source(ckpt: HFCheckpoint, plan: ModelPlan) -> None:
    problems = source_problems(ckpt, plan)
    if problems:
        more = f"\n  ... and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise CheckpointError(f"{ckpt.root}: " + "\n  ".join(problems[:5]) + more)


def source_fingerprint(ckpt: HFCheckpoint) -> str:
    """sha256 over config.json, the index, and each shard's name, size and safetensors header.

    Cheap (no weight bytes are read) and stable under copying (no mtimes); it changes when
    any tensor's name, dtype, shape or offset changes or a shard is rewritten with a different
    size, but not when weight bytes are edited in place (use `builder check` for content).
    """
    digest = hashlib.sha256()
    for meta in ("config.json", INDEX_NAME):
        path = ckpt.root / meta
        if path.is_file():
            digest.update(meta.encode() + b"\0" + path.read_bytes())
    for file in ckpt.files():
        digest.update(f"{file.name}\0{file.stat().st_size}\0".encode())
        digest.update(_raw_header(file))
    return digest.hexdigest()


def _raw_header(file: Path) -> bytes:
    with open(file, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return head
        return head + handle.read(min(int.from_bytes(head, "little"), 100 << 20))


# ---- reading ------------------------------------------------------------------------------------
Block = np.ndarray | Any  # Any: a torch.Tensor (dtype changes, pickle checkpoints)


class SourceReader:
    """Streams the pieces of rank tensors from one HF checkpoint in bounded row blocks.

    Every block is checked for NaN/Inf (an error names the HF tensor and the position).
    A block lives in a reused buffer (or mapping): valid until the next one is requested.
    """

    def __init__(
        self,
        ckpt: HFCheckpoint,
        out_dtype: Dtype | Any,
        block_bytes: int = DEFAULT_BLOCK_BYTES,
        check_finite: bool = True,
    ):
        self.ckpt = ckpt
        self.out_dtype = dtype_of(out_dtype)
        self.block_bytes = block_bytes
        self.check_finite = check_finite
        self._buffer: bytearray | None = None
        self._gather: np.ndarray | None = None
        self._scratch: np.ndarray | None = None
        self._fds: dict[Path, int] = {}

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- public -------------------------------------------------------------------------------
    def blocks(self, rp: ReadPlan, strided: bool = False) -> Iterator[Block]:
        """The bytes of `rp.item` in order: numpy arrays of bytes already in `out_dtype`
        (valid until the next block is requested), or torch tensors of `out_dtype` where a
        cast was needed.

        `strided`: column ranges come as 2-D uint8 views (rows x bytes) of the mapped
        source, valid until the next block is requested, instead of gathered copies: for a
        consumer that reads them once (a table lookup) the gather would be a wasted pass."""
        for piece in rp.pieces:
            yield from self._piece_blocks(piece, strided)
        if rp.pad_rows:
            width = rp.item.shape[1]
            row_bytes = width * self.out_dtype.itemsize
            rows = max(1, self.block_bytes // row_bytes)
            for start in range(0, rp.pad_rows, rows):
                yield np.zeros(min(rows, rp.pad_rows - start) * row_bytes, dtype=np.uint8)

    def piece_blocks(self, piece: Piece) -> Iterator[Block]:
        """The bytes of one piece of an HF tensor, as `blocks` yields them."""
        return self._piece_blocks(piece)

    def assemble(self, rp: ReadPlan) -> Any:
        """The whole rank tensor as a torch tensor (for transforms that compute on it, e.g.
        FP8 quantization); the only reader path that needs torch for a same-dtype source."""
        import torch

        out = np.empty(math.prod(rp.item.shape) * self.out_dtype.itemsize, dtype=np.uint8)
        offset = 0
        for block in self.blocks(rp):
            raw = as_bytes(block)
            out[offset : offset + len(raw)] = np.frombuffer(raw, dtype=np.uint8)
            offset += len(raw)
        return torch.from_numpy(out).view(self.out_dtype.torch).view(rp.item.shape)

    # ---- pieces -----------------------------------------------------------------------------
    def _piece_blocks(self, piece: Piece, strided: bool = False) -> Iterator[Block]:
        info = self.ckpt.info(piece.source)
        location = self.ckpt.data_location(piece.source)  # None for a (trusted) pickle file
        if piece.rows is None:
            if location is None:
                block = self.ckpt.read(piece.source)
            else:
                raw = self._read(piece.source, location, 0, location[2])
                block = np.frombuffer(raw, dtype=np.uint8).copy()
            yield self._checked(piece.source, info, block, 0)
            return
        width = (piece.cols.stop - piece.cols.start) if piece.cols else info.shape[1]
        itemsize = max(info.dtype.itemsize, self.out_dtype.itemsize)
        budget = self.block_bytes
        if location is not None and info.dtype == self.out_dtype and not (strided and piece.cols):
            # bytes that go out as they are: cache-sized, so check, hash and write find them there
            budget = min(budget, SPAN_BYTES)
        step = max(1, budget // (width * itemsize))
        first_col = piece.cols.start if piece.cols else 0
        for start in range(piece.rows.start, piece.rows.stop, step):
            stop = min(start + step, piece.rows.stop)
            if location is None:
                block = self.ckpt.read(piece.source, rows=slice(start, stop), cols=piece.cols)
            elif piece.cols is None:
                block = self._rows(piece.source, location, info, start, stop)
            elif strided and info.dtype == self.out_dtype:
                yield from self._column_view(piece.source, location, info, start, stop, piece.cols)
                continue
            else:
                block = self._columns(location, info, start, stop, piece.cols)
            yield self._checked(piece.source, info, block, start, first_col, width)

    def _checked(
        self,
        name: str,
        info,
        block: np.ndarray | Any,
        first_row: int,
        first_col: int = 0,
        width: int | None = None,
    ) -> Block:
        """`block` (bytes of `info.dtype`, or a torch tensor from a pickle) scanned for
        NaN/Inf and, if the output dtype differs, cast with range checks."""
        if is_torch_tensor(block):  # a pickle checkpoint's slice
            self._check(name, info.dtype, as_bytes(block), first_row, first_col, width)
            return self._cast(name, block, first_row, first_col)
        self._check(name, info.dtype, block, first_row, first_col, width)
        if info.dtype == self.out_dtype:
            return block
        import torch

        tensor = torch.from_numpy(block).view(info.dtype.torch)
        if width is not None:
            tensor = tensor.view(-1, width)
        return self._cast(name, tensor, first_row, first_col)

    def _read(
        self, name: str, location: tuple[Path, int, int], begin: int, size: int
    ) -> memoryview:
        """`size` bytes at `begin` of a tensor's data, into the reused buffer (os.preadv)."""
        file, offset, _ = location
        if self._buffer is None or len(self._buffer) < size:
            # grown on demand (not block_bytes up front): zero-filling 64 MiB per rank file
            # would dominate small conversions
            self._buffer = bytearray(-(-size // (1 << 20)) * (1 << 20))
        view = memoryview(self._buffer)[:size]
        fd, done = self._fd(file), 0
        while done < size:
            n = os.preadv(fd, [view[done:]], offset + begin + done)
            if n == 0:
                raise CheckpointError(f"{file}: truncated while reading tensor {name!r}")
            done += n
        return view

    def _rows(
        self, name: str, location: tuple[Path, int, int], info, start: int, stop: int
    ) -> np.ndarray:
        row_bytes = info.shape[1] * info.dtype.itemsize
        raw = self._read(name, location, start * row_bytes, (stop - start) * row_bytes)
        return np.frombuffer(raw, dtype=np.uint8)

    def _columns(
        self, location: tuple[Path, int, int], info, start: int, stop: int, cols: slice
    ) -> np.ndarray:
        """Rows start..stop, columns `cols` of a 2-D tensor: a strided copy out of a short-lived
        mmap of just those rows (unmapped at once, so the source never counts in our RSS)."""
        file, offset, _ = location
        elt = info.dtype.itemsize
        row_bytes = info.shape[1] * elt
        begin = offset + start * row_bytes
        length = (stop - start) * row_bytes
        width = (cols.stop - cols.start) * elt
        picked = self._gather_buffer((stop - start) * width).reshape(stop - start, width)
        mm, at = map_range(self._fd(file), begin, length)
        with mm:
            rows = np.frombuffer(mm, dtype=np.uint8, count=length, offset=at)
            np.copyto(
                picked,
                rows.reshape(stop - start, row_bytes)[
                    :, cols.start * elt : cols.start * elt + width
                ],
            )
            del rows  # no view may outlive the mapping
        return picked.reshape(-1)

    def _column_view(
        self, name: str, location: tuple[Path, int, int], info, start: int, stop: int, cols: slice
    ) -> Iterator[np.ndarray]:
        """Rows start..stop, columns `cols`, as a 2-D view of a short-lived mapping (checked)."""
        file, offset, _ = location
        elt = info.dtype.itemsize
        row_bytes = info.shape[1] * elt
        begin = offset + start * row_bytes
        length = (stop - start) * row_bytes
        mm, at = map_range(self._fd(file), begin, length)
        try:
            rows = np.frombuffer(mm, dtype=np.uint8, count=length, offset=at)
            view = rows.reshape(stop - start, row_bytes)[:, cols.start * elt : cols.stop * elt]
            del rows
            self._check(name, info.dtype, view, start, cols.start, cols.stop - cols.start)
            yield view
            del view  # no view may outlive the mapping
        finally:
            try:
                mm.close()
            except BufferError:  # a consumer kept a view; the mapping goes when it does
                pass

    def _gather_buffer(self, size: int) -> np.ndarray:
        """A reused output buffer for column gathers (fresh pages per block cost more than the
        copy)."""
        if self._gather is None or self._gather.size < size:
            self._gather = np.empty(-(-size // (1 << 20)) * (1 << 20), dtype=np.uint8)
        return self._gather[:size]

    def _scratch_buffer(self, size: int) -> np.ndarray:
        if self._scratch is None or self._scratch.size < size:
            self._scratch = np.empty(-(-size // (1 << 20)) * (1 << 20), dtype=np.uint8)
        return self._scratch[:size]

    def _fd(self, file: Path) -> int:
        if file not in self._fds:
            self._fds[file] = os.open(file, os.O_RDONLY)
            os.posix_fadvise(self._fds[file], 0, 0, os.POSIX_FADV_SEQUENTIAL)
        return self._fds[file]

    def _check(
        self,
        name: str,
        dtype: Dtype,
        raw: Any,
        first_row: int,
        first_col: int = 0,
        width: int | None = None,
    ) -> None:
        if not self.check_finite or dtype not in FLOAT_DTYPES:
            return
        data = raw if isinstance(raw, np.ndarray) else np.frombuffer(raw, dtype=np.uint8)
        scratch = self._scratch_buffer(data.size).view(dtype.bits)
        bad = first_nonfinite(data, dtype, scratch)
        if bad is None:
            return
        value = element_value(data, dtype, bad)
        where = _position(width, bad, first_row, first_col)
        info = self.ckpt.info(name)
        raise NonFiniteWeight(f"{info.file}: tensor {name!r} holds {value} at {where}")

    def _cast(self, name: str, block: Any, first_row: int, first_col: int = 0) -> Any:
        return cast_checked(
            block, self.out_dtype, name, self.ckpt.info(name).file, first_row, first_col
        )


# ---- bits ---------------------------------------------------------------------------------------
def first_nonfinite(
    data: np.ndarray, dtype: Dtype, scratch: np.ndarray | None = None
) -> int | None:
    """Index of the first NaN/Inf element of `data` (raw bytes of `dtype`), or None.

    A float is NaN or Inf exactly when its exponent bits are all ones. Read as a signed
    integer, a positive one is then >= the exponent mask; read as unsigned, a negative one
    is >= sign bit | mask; no finite value reaches either. So two max reductions, which only
    read the block, clear it; the position is searched only in a block that has one.
    `scratch`: a reused buffer of the block's size for that search.
    """
    bits = data.view(dtype.bits)  # (a 2-D strided view of rows works too)
    if not bits.size:
        return None
    mask = dtype.bits.type(dtype.exponent_mask)
    negative = dtype.bits.type(dtype.exponent_mask | (1 << (8 * dtype.itemsize - 1)))
    if data.view(f"<i{dtype.itemsize}").max() < mask and bits.max() < negative:
        return None
    into = scratch[: bits.size].reshape(bits.shape) if scratch is not None else None
    out = np.bitwise_and(bits, mask, out=into)
    return int(np.flatnonzero(out == mask)[0])


def element_value(data: np.ndarray, dtype: Dtype, index: int) -> float:
    """Element `index` of raw bytes `data` of float type `dtype`, as a Python float."""
    raw = int(data.view(dtype.bits).reshape(-1)[index])
    if dtype == BF16:
        return float(np.array([raw << 16], dtype=np.uint32).view(np.float32)[0])
    if dtype in (F16, F32, F64):
        numpy_type = {2: np.float16, 4: np.float32, 8: np.float64}[dtype.itemsize]
        return float(np.array([raw], dtype=dtype.bits).view(numpy_type)[0])
    return float("nan") if raw & dtype.exponent_mask == dtype.exponent_mask else 0.0


def cast_checked(
    block: Any,
    dtype: Dtype | Any,
    name: str,
    file: Path,
    first_row: int = 0,
    first_col: int = 0,
) -> Any:
    """`block` (a torch tensor: rows from `first_row`, columns from `first_col` of tensor
    `name`) in `dtype`.

    A finite value that becomes +-Inf, or a value that becomes 0 and mattered, is an error
    naming the file, the tensor, the position and the value. "Mattered": larger than the
    rounding error the cast makes anyway on the block's largest value (half an ulp of the
    target, relative). A weight of 2e-8 next to weights of 0.02 loses less by flushing to
    zero in float16 than those lose by rounding (real checkpoints hold millions of such
    values); a block whose values all flush is lost.
    """
    import torch

    dtype = dtype_of(dtype).torch
    out = block.to(dtype)
    if block.dtype == dtype or not narrows_range(block.dtype, dtype) or not out.numel():
        return out
    low, high = torch.aminmax(out)
    overflow = (
        None
        if torch.isfinite(low) and torch.isfinite(high)
        else (~torch.isfinite(out) & torch.isfinite(block))
    )
    if overflow is not None and overflow.any():
        _cast_error(
            block,
            overflow,
            name,
            file,
            first_row,
            first_col,
            f"overflows {dtype_name(dtype)} (largest {torch.finfo(dtype).max:g})",
        )
    scale = max(abs(float(low)), abs(float(high))) if overflow is None else 0.0
    rounding = scale * torch.finfo(dtype).eps / 2
    underflow = (out == 0) & (block.abs() > rounding)
    if underflow.any():
        smallest = torch.finfo(dtype).tiny * torch.finfo(dtype).eps
        _cast_error(
            block,
            underflow,
            name,
            file,
            first_row,
            first_col,
            f"becomes 0 in {dtype_name(dtype)} (smallest non-zero {smallest:g})",
        )
    return out


def _cast_error(block, mask, name, file, first_row, first_col, what) -> None:
    import torch

    bad = int(torch.nonzero(mask.reshape(-1))[0])
    value = block.reshape(-1)[bad].item()
    width = block.shape[1] if block.dim() == 2 else None
    where = _position(width, bad, first_row, first_col)
    raise UnrepresentableWeight(
        f"{file}: tensor {name!r} holds {value:g} at {where}, which {what}; "
        f"keep the checkpoint's dtype ({dtype_name(block.dtype)}) or fix the weight"
    )


def narrows_range(source: Any, target: Any) -> bool:
    """True if some finite non-zero `source` value overflows or flushes to zero in `target`
    (torch dtypes)."""
    import torch

    if not (source.is_floating_point and target.is_floating_point):
        return False
    s, t = torch.finfo(source), torch.finfo(target)
    return t.max < s.max or t.tiny * t.eps > s.tiny * s.eps


def dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def _position(width: int | None, flat_index: int, first_row: int, first_col: int) -> str:
    """Where element `flat_index` of a block (rows of `width`; None: a 1-D tensor) lies."""
    if width is None:
        return f"element {flat_index}"
    return f"row {first_row + flat_index // width}, column {first_col + flat_index % width}"

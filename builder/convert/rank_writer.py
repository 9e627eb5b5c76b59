"""Writing one `rank{R}.safetensors`: header from the plan, then each tensor streamed in order."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from builder.arch.plan import ModelPlan
from builder.convert.layout import RankTransform, rank_layout
from builder.convert.sources import DEFAULT_BLOCK_BYTES, SourceReader, read_plan
from builder.dtypes import Dtype
from builder.io.checkpoint import HFCheckpoint
from builder.io.safetensors_stream import (
    SafetensorsStreamWriter,
    SafetensorsWriteError,
    as_bytes,
)

Progress = Callable[[int], None]  # called with the number of bytes just written
PROGRESS_STEP = 32 << 20  # bytes between progress reports (a worker's go through a queue)


def rank_metadata(rank: int, tp: int, pp: int) -> dict[str, str]:
    """The `__metadata__` of a rank file (part of the header, so part of its exact size)."""
    return {"format": "pt", "producer": "builder", "rank": str(rank), "tp": str(tp), "pp": str(pp)}


@dataclass(frozen=True)
class RankResult:
    rank: int
    file: str
    size: int
    digest: str  # builder.io.manifest.DIGEST, computed while writing
    tensors: int
    seconds: float


def write_rank_file(
    ckpt: HFCheckpoint,
    plan: ModelPlan,
    tp: int,
    pp: int,
    rank: int,
    dtype: Dtype,
    path: Path,
    *,
    transform: RankTransform | None = None,
    progress: Progress | None = None,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    check_finite: bool = True,
) -> RankResult:
    """Write rank `rank` of the tp x pp layout to `path` (deleted again if anything fails).

    Without a transform each tensor is streamed in row blocks of at most `block_bytes`;
    with one, tensors it passes through unchanged are streamed, tensors it changes
    elementwise (`transform.blockwise`) are streamed through its block function, and the
    rest are assembled whole (bounded by the largest rank slice), given to
    `transform.apply`, and its outputs are written.
    """
    started = time.perf_counter()
    layout = rank_layout(plan, tp, pp, rank, dtype, transform)
    metadata = rank_metadata(rank, tp, pp)
    report = _Batched(progress)
    with (
        SourceReader(ckpt, dtype, block_bytes, check_finite) as reader,
        SafetensorsStreamWriter(path, layout.flat_specs, metadata) as writer,
    ):
        for item, specs in zip(layout.items, layout.specs, strict=True):
            rp = read_plan(plan, item, tp, rank % tp)
            if transform is None or _passes_through(transform, item):
                _stream(writer, item.name, reader.blocks(rp), None, report)
                continue
            blockwise = _blockwise(transform, item, dtype)
            if blockwise is not None:  # elementwise: no whole tensor in memory
                convert, extras = blockwise
                _check_outputs(item.name, [(item.name, None), *extras], specs, path)
                _stream(writer, item.name, reader.blocks(rp, strided=True), convert, report)
                outputs = extras
            else:
                outputs = transform.apply(item, reader.assemble(rp))
                _check_outputs(item.name, outputs, specs, path)
            for name, tensor in outputs:
                writer.write(name, tensor)
                report(tensor.nbytes)
    report.flush()
    result = writer.result
    return RankResult(
        rank, path.name, result.size, result.digest, result.tensors, time.perf_counter() - started
    )


class _Batched:
    """`progress` called with at least PROGRESS_STEP bytes at a time: blocks are cache-sized,
    and one report per block (pickled through a queue, from a worker) would cost more than
    the copy."""

    def __init__(self, progress: Progress | None):
        self.progress, self.pending = progress, 0

    def __call__(self, nbytes: int) -> None:
        self.pending += nbytes
        if self.pending >= PROGRESS_STEP:
            self.flush()

    def flush(self) -> None:
        if self.progress is not None and self.pending:
            self.progress(self.pending)
        self.pending = 0


def _stream(writer, name: str, blocks, convert, report: Progress) -> None:
    """Write tensor `name` from `blocks`, each passed through `convert` if given."""
    writer.start(name)
    for block in blocks:
        size = block.nbytes
        if convert is not None:
            block = convert(block if isinstance(block, np.ndarray) else as_bytes(block))
        writer.append(block)
        report(size)
    writer.finish()


def _blockwise(transform: RankTransform, item, dtype: Dtype):
    check = getattr(transform, "blockwise", None)
    return check(item, dtype) if check else None


def _passes_through(transform: RankTransform, item) -> bool:
    check = getattr(transform, "passthrough", None)
    return bool(check and check(item))


def _check_outputs(source: str, outputs, specs, path: Path) -> None:
    got = [name for name, _ in outputs]
    want = [spec.name for spec in specs]
    if got != want:
        raise SafetensorsWriteError(
            f"{path}: the transform returned {got} for {source!r}, but declared {want}"
        )

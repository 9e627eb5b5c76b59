"""Prefetching the next block: it really loads ahead, at most two blocks live, no thread
outlives the stream, and calibration and golden streaming are bit-identical with and without."""

from __future__ import annotations

import threading

import pytest
import torch

from builder.io.prefetch import StreamStats, prefetched

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_next_load_overlaps_the_current_block():
    started = {k: threading.Event() for k in range(4)}
    alive: set[int] = set()
    most_alive = []

    def load(k):
        started[k].set()
        alive.add(k)
        return torch.full((8,), float(k))

    seen = []
    for k, loaded in prefetched(list(range(4)), load, enabled=True):
        value = loaded.take()
        if k + 1 < 4:  # the next block loads while this one is being "computed"
            assert started[k + 1].wait(5)
        most_alive.append(len(alive))
        seen.append(int(value[0]))
        alive.discard(k)
    assert seen == [0, 1, 2, 3] and max(most_alive) <= 2


def test_closing_early_waits_for_the_pending_load():
    before = {t.name for t in threading.enumerate()}
    stats = StreamStats()
    loads = prefetched([1, 2, 3], lambda k: torch.zeros(k), enabled=True, stats=stats)
    key, loaded = next(loads)
    loaded.take()
    with pytest.raises(RuntimeError):
        loaded.take()
    loads.close()
    assert {t.name for t in threading.enumerate()} - before == set()
    assert key == 1 and stats.prefetch and stats.blocks >= 1


def test_calibration_is_bit_identical_with_and_without_prefetch(mixed_ckpt):
    from builder.arch import load_plan
    from builder.io.checkpoint import HFCheckpoint
    from builder.quantize.blockwise import CalibOptions, calibrate_blockwise
    from builder.quantize.pipeline import reference_parts

    windows = torch.randint(5, 261, (4, 16), generator=torch.Generator().manual_seed(1))
    results = [
        calibrate_blockwise(
            HFCheckpoint(mixed_ckpt),
            load_plan(mixed_ckpt),
            reference_parts(mixed_ckpt),
            windows,
            CalibOptions(batch_size=2, prefetch=prefetch),
        )
        for prefetch in (False, True)
    ]
    assert results[0].table.values == results[1].table.values
    off, on = (r.summary()["weights"] for r in results)
    assert off["bytes"] == on["bytes"] > 0 and off["blocks"] == on["blocks"]
    assert (off["prefetch"], on["prefetch"]) == (False, True)


def test_golden_stream_is_bit_identical_with_and_without_prefetch(mixed_ckpt):
    from builder.verify.stream import BlockStream, Sequence

    ids = [torch.tensor([5, 9, 33, 100, 7]), torch.tensor([44, 2, 250])]
    outputs = []
    for prefetch in (False, True):
        stream = BlockStream(mixed_ckpt, torch.bfloat16, keep_blocks=False, prefetch=prefetch)
        sequences = [Sequence(torch.empty(0, dtype=torch.long)) for _ in ids]
        first = stream.forward(sequences, ids, use_cache=True)
        second = stream.forward(sequences, [torch.tensor([3]), torch.tensor([4])], use_cache=True)
        outputs.append([*first, *second])
        weights = stream.streaming()
        assert weights["prefetch"] is prefetch and weights["bytes"] > 0
        assert weights["blocks"] == 2 * sum(not lay.is_empty for lay in stream.plan.layers)
    for off, on in zip(*outputs, strict=True):
        assert torch.equal(off, on)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (side stream, pinned)")
def test_cuda_side_stream_prefetch_is_bit_identical(mixed_ckpt):
    from builder.verify.stream import BlockStream, Sequence

    ids = [torch.tensor([5, 9, 33, 100, 7])]
    outputs = []
    for prefetch in (False, True):
        stream = BlockStream(
            mixed_ckpt, torch.bfloat16, "cuda", keep_blocks=False, prefetch=prefetch
        )
        sequences = [Sequence(torch.empty(0, dtype=torch.long)) for _ in ids]
        outputs.append(stream.forward(sequences, ids)[0].cpu())
    assert torch.equal(*outputs)

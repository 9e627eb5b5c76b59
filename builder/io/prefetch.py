"""Block streaming with the next block's weights loaded while the current one computes.

Calibration (builder.quantize.blockwise) and the golden / hf runtime (builder.verify.stream)
visit the model one block at a time: read a block's weights, run every sequence through it,
free it. `prefetched` overlaps the two: one background thread loads block i+1 while the
caller computes block i, so at most two blocks are alive (the one computing and the next).
The values are the same either way (the same load function on the same bytes), which the
tests check bit for bit.

On CUDA the load runs on a side stream: the loaders copy each chunk into pinned host memory
and from there with `non_blocking=True`, so the host-to-device copies of block i+1 run
beside block i's kernels; the caller's stream waits on the load's event before it uses the
block, and every tensor is marked used by the caller's stream (`record_stream`) so the
caching allocator cannot hand its memory to the next load while kernels still read it.

`StreamStats` counts what was streamed: bytes, seconds spent loading (on the thread or
inline) and seconds the caller waited for a load; `summary(wall)` gives GB/s.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch

K = TypeVar("K")
V = TypeVar("V")


@dataclass
class StreamStats:
    prefetch: bool = False
    blocks: int = 0
    bytes: int = 0
    load_seconds: float = 0.0  # sum of the loads' durations
    wait_seconds: float = 0.0  # time the caller spent waiting for a load
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, nbytes: int, seconds: float) -> None:
        with self._lock:
            self.blocks += 1
            self.bytes += nbytes
            self.load_seconds += seconds

    def summary(self, wall_seconds: float) -> dict[str, Any]:
        """For JSON: the streaming rate over the whole pass (bytes / wall) and of the loads
        alone (bytes / load seconds); with prefetch the load time hides behind compute."""
        return {
            "prefetch": self.prefetch,
            "blocks": self.blocks,
            "bytes": self.bytes,
            "wall_seconds": round(wall_seconds, 3),
            "load_seconds": round(self.load_seconds, 3),
            "wait_seconds": round(self.wait_seconds, 3),
            "stream_gb_per_s": round(self.bytes / wall_seconds / 1e9, 3) if wall_seconds else None,
            "load_gb_per_s": (
                round(self.bytes / self.load_seconds / 1e9, 3) if self.load_seconds else None
            ),
        }


def prefetch_by_default(device: str) -> bool:
    """On CUDA: the load is host work beside the GPU's compute. Not on the CPU, where the
    loading thread takes cores from the compute it should hide behind (measured slower on a
    busy 2-core machine: scripts/bench_prefetch.py, docs/distributed.md)."""
    return str(device).startswith("cuda")


def module_bytes(value: Any) -> int:
    if isinstance(value, torch.nn.Module):
        tensors = [*value.parameters(), *value.buffers()]
        return sum(t.numel() * t.element_size() for t in tensors)
    return 0


class Loaded(Generic[V]):
    """One loaded value; `take()` hands it over once, so the stream keeps no reference
    (a caller freeing a block frees it)."""

    def __init__(self, value: V, event: Any = None):
        self._value: V | None = value
        self._event = event

    def take(self) -> V:
        value, self._value = self._value, None
        if value is None:
            raise RuntimeError("a prefetched value is taken once")
        if self._event is not None:  # CUDA: the load ran on a side stream
            current = torch.cuda.current_stream()
            current.wait_event(self._event)
            if isinstance(value, torch.nn.Module):
                for tensor in [*value.parameters(), *value.buffers()]:
                    if tensor.is_cuda:
                        tensor.record_stream(current)
        return value


def _load(load: Callable[[K], V], key: K, device: str, stats: StreamStats) -> Loaded[V]:
    start = time.perf_counter()
    if device.startswith("cuda") and torch.cuda.is_available():
        # CUDA's current device is per thread: this thread starts on device 0 whatever rank
        with torch.cuda.device(torch.device(device)):
            side = torch.cuda.Stream()
            with torch.cuda.stream(side):
                value = load(key)
                event = torch.cuda.Event()
                event.record(side)
            event.synchronize()  # on the loading thread: the load's time is its copies' time
        loaded = Loaded(value, event)
    else:
        value = load(key)
        loaded = Loaded(value)
    stats.add(module_bytes(value), time.perf_counter() - start)
    return loaded


def prefetched(
    keys: Sequence[K],
    load: Callable[[K], V],
    *,
    enabled: bool = True,
    device: str = "cpu",
    stats: StreamStats | None = None,
) -> Iterator[tuple[K, Loaded[V]]]:
    """(key, Loaded) for every key in order; with `enabled`, load(keys[i + 1]) runs on a
    background thread while the caller works on keys[i]. Closing the iterator early (an
    exception in the caller) waits for the pending load, so no thread outlives it."""
    stats = stats if stats is not None else StreamStats()
    stats.prefetch = enabled
    if not enabled:
        for key in keys:
            loaded = _load(load, key, "cpu", stats)  # inline: same stream as the compute
            yield key, loaded
        return
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
    try:
        pending: Future | None = pool.submit(_load, load, keys[0], device, stats) if keys else None
        for k, key in enumerate(keys):
            waited = time.perf_counter()
            loaded = pending.result()
            stats.wait_seconds += time.perf_counter() - waited
            more = k + 1 < len(keys)
            pending = pool.submit(_load, load, keys[k + 1], device, stats) if more else None
            yield key, loaded
            del loaded
    finally:
        pool.shutdown(wait=True, cancel_futures=True)

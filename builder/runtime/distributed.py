"""Tensor parallelism over real collectives: one process per TP rank, torch.distributed.

`TrtllmCheckpointExecutor` plays every rank of a checkpoint in one process and combines the
partial results as the collectives would. `DistributedExecutor` is the same executor with
each process holding only its own rank file; the combination goes through torch.distributed:
row-parallel outputs (attention `dense`, MLP `proj`) are all-reduced (SUM), column-parallel
ones (linear attention / linear FFN replacements, `lm_head`) all-gathered along the feature
dimension. Every rank ends each layer with the same activations and the same logits.

The backend follows the device: NCCL on CUDA, gloo on the CPU. NVLink multicast stays off in
every process started here (`NO_MULTICAST_ENV`, the lent GPU hosts' rule): a program using
it can put a shared host's GPUs out of service.

How close the logits are to the one-process executor's (what the tests assert):

  Each rank's own arithmetic is the same operations on the same rank file in both cases; only
  the combination differs. The one-process executor sums the TP partials p_0 + p_1 + ... in
  rank order, rounding after each add. A collective may add them in another order. For two
  ranks there is only one sum, p_0 + p_1 = p_1 + p_0 (IEEE addition is commutative), so at
  TP2 in fp32 the logits are bit-identical provided each rank's GEMMs run the same kernels
  (the same thread count: a GEMM's summation split depends on it). In bf16 a collective may
  also add in fp32 and round once where the executor rounds once too (bf16 + bf16 computed
  exactly and rounded): still bit-identical at TP2. For TP N > 2 the order of N - 1 adds
  differs: each reordered sum differs by at most (N - 2) * u * sum_i |p_i| (u: 2^-24 fp32,
  2^-9 bf16 per rounding) and `logits_tolerance` bounds the relative logit error by adding
  that per reduction, two reductions per block, growing linearly along the layers (the same
  first-order bound as the executor's tests: errors of independent roundings add at most
  linearly; it assumes no heavy cancellation, sum_i |p_i| of the order of |sum_i p_i|; on
  the synthetic model at TP4 the measured error is 5x under it, tests/runtime/
  test_distributed.py). All-gather moves values without arithmetic: exact.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from builder.errors import UserError
from builder.runtime.executor import TrtllmCheckpointExecutor

# NVLink SHARP / multicast off in NCCL, PyTorch's symmetric memory and NVSHMEM.
NO_MULTICAST_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-9, torch.float16: 2.0**-11}


def keep_multicast_off(env: dict[str, str] | Any = None) -> None:
    """Force the multicast-off variables into `env` (os.environ by default), whatever it held:
    NCCL reads them at communicator creation, so this runs before any process group exists."""
    target = os.environ if env is None else env
    target.update(NO_MULTICAST_ENV)


def backend_for(device: str | torch.device) -> str:
    return "nccl" if str(device).startswith("cuda") else "gloo"


def world() -> tuple[int, int]:
    """(rank, world size) of the current process group; (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def join_group(device: str) -> str:
    """Join the process group torchrun (or `launch_local`) set up in the environment; returns
    this rank's device. A world of one (no WORLD_SIZE) joins nothing. On CUDA each process
    takes the GPU of its LOCAL_RANK and NCCL; on the CPU gloo."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    keep_multicast_off()
    if str(device).startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend_for(device))
    return device


def leave_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---- the executor -------------------------------------------------------------------------------
class DistributedExecutor(TrtllmCheckpointExecutor):
    """The executor with one TP rank per process: this process's rank file only, partial
    results combined by torch.distributed (see the module docstring). Pipeline parallel
    checkpoints are not supported here (pp must be 1); the world size must equal tp."""

    def __init__(self, directory: str | Path, *args: Any, **kwargs: Any):
        self.rank, self.world_size = world()
        super().__init__(directory, *args, **kwargs)
        if self.pp != 1 or self.tp != self.world_size:
            raise UserError(
                f"{self.directory / 'config.json'}: mapping tp={self.tp}, pp={self.pp}; the "
                f"distributed executor needs pp=1 and tp equal to the world size "
                f"({self.world_size} processes)"
            )

    def local_ranks(self) -> list[int]:
        return [self.rank]

    def stage_ranks(self, pp_rank: int) -> list[int]:
        return [self.rank]

    def all_reduce(self, parts: list[torch.Tensor]) -> torch.Tensor:
        import torch.distributed as dist

        (part,) = parts
        total = part.contiguous().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total

    def all_gather(self, parts: list[torch.Tensor]) -> torch.Tensor:
        import torch.distributed as dist

        (part,) = parts
        part = part.contiguous()
        pieces = [torch.empty_like(part) for _ in range(self.world_size)]
        dist.all_gather(pieces, part)
        return torch.cat(pieces, dim=-1)


def logits_tolerance(num_layers: int, tp: int, dtype: torch.dtype) -> float:
    """Relative logit error (max |a - b| / max |b|) allowed between the distributed and the
    one-process executor on the same checkpoint (derivation in the module docstring).

    Zero at TP <= 2 (one add: commutative). Above, each of the two reductions per block and the
    lm_head path reorders N - 1 adds: (N - 2) unit roundoffs per reduction, summed over the
    layers. Conservative in that it takes every block as attention + MLP.
    """
    if tp <= 2:
        return 0.0
    return (2 * num_layers + 1) * (tp - 2) * UNIT_ROUNDOFF[dtype]


# ---- measurements -------------------------------------------------------------------------------
@dataclass(frozen=True)
class DecodeRun:
    """What one rank measured: the prefill's and each decode step's logits, step times."""

    logits: list[torch.Tensor]
    step_seconds: list[float]
    tokens: list[list[int]]

    def median_step_seconds(self) -> float:
        steps = sorted(self.step_seconds)
        return steps[len(steps) // 2]


def decode(executor: TrtllmCheckpointExecutor, prompts: list[list[int]], steps: int) -> DecodeRun:
    """Greedy prefill + `steps - 1` decode steps, keeping logits; step times from the
    executor's own token timestamps (each waits for the step's tokens)."""
    gen = executor.greedy(prompts, steps, keep_logits=True)
    times = gen.token_times
    return DecodeRun(
        logits=[g.float().cpu() for g in gen.logits],
        step_seconds=[b - a for a, b in zip(times, times[1:], strict=False)],
        tokens=gen.tokens,
    )


# ---- launching on one host ---------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, size: int, port: int, device: str, fn: Callable, args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(size),
    )
    device = join_group(device)
    try:
        fn(rank, size, device, *args)
    finally:
        leave_group()


def launch_local(size: int, device: str, fn: Callable, args: Sequence[Any] = ()) -> None:
    """Run `fn(rank, size, device, *args)` in `size` spawned processes of one process group
    on this host (gloo over loopback on the CPU, NCCL on CUDA), multicast kept off in each.

    `fn` must be importable (a module-level function). Returns when all have finished; a
    failing rank raises here (torch.multiprocessing terminates the others).
    """
    import torch.multiprocessing as mp

    keep_multicast_off()  # spawned children inherit the environment
    mp.spawn(_entry, args=(size, free_port(), device, fn, tuple(args)), nprocs=size, join=True)


def tp_decode_worker(
    rank: int,
    size: int,
    device: str,
    directory: str,
    prompts: list[list[int]],
    steps: int,
    dtype: str,
    threads: int,
    out: str,
) -> None:
    """One TP rank of `decode` (launch_local target): rank 0 writes the logits and times."""
    torch.set_num_threads(threads)
    with DistributedExecutor(directory, getattr(torch, dtype), device, keep_weights=True) as ex:
        run = decode(ex, prompts, steps)
    if rank == 0:
        save_run(run, Path(out))


def save_run(run: DecodeRun, out: Path) -> None:
    import json

    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file({f"step.{k}": t.contiguous() for k, t in enumerate(run.logits)}, out / "logits.st")
    (out / "run.json").write_text(
        json.dumps({"step_seconds": run.step_seconds, "tokens": run.tokens}) + "\n"
    )


def load_run(out: Path) -> DecodeRun:
    import json

    from safetensors.torch import load_file

    logits = load_file(out / "logits.st")
    meta = json.loads((out / "run.json").read_text())
    return DecodeRun(
        [logits[f"step.{k}"] for k in range(len(logits))], meta["step_seconds"], meta["tokens"]
    )

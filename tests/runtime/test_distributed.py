"""TP over real collectives: two gloo processes, each with its own rank file, against the
one-process executor on the same TP2 checkpoint (bit-identical at TP2, see
builder.runtime.distributed's docstring for why and for the tolerance above TP2)."""

from __future__ import annotations

import os

import pytest
import torch

from builder.convert import convert_checkpoint
from builder.errors import UserError
from builder.runtime import TrtllmCheckpointExecutor
from builder.runtime.distributed import (
    NO_MULTICAST_ENV,
    DistributedExecutor,
    backend_for,
    decode,
    keep_multicast_off,
    launch_local,
    load_run,
    logits_tolerance,
    tp_decode_worker,
)

PROMPTS = [[5, 17, 99, 3, 250, 7], [12, 44, 8]]  # ragged: left padding and masks exercised
STEPS = 4


@pytest.fixture(scope="module")
def tp2_dirs(tmp_path_factory, mixed_ckpt, mixed_ckpt_fp32):
    root = tmp_path_factory.mktemp("tp2")
    convert_checkpoint(mixed_ckpt_fp32, root / "fp32", 2)
    convert_checkpoint(mixed_ckpt, root / "bf16", 2)
    return root


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_two_processes_match_one_process_executor(tmp_path, tp2_dirs, dtype):
    directory = tp2_dirs / ("fp32" if dtype == "float32" else "bf16")
    launch_local(
        2, "cpu", tp_decode_worker, (str(directory), PROMPTS, STEPS, dtype, 1, str(tmp_path))
    )
    distributed = load_run(tmp_path)
    with TrtllmCheckpointExecutor(directory, getattr(torch, dtype), keep_weights=True) as ex:
        single = decode(ex, PROMPTS, STEPS)
    assert distributed.tokens == single.tokens
    assert len(distributed.logits) == len(single.logits) == STEPS
    assert logits_tolerance(12, 2, getattr(torch, dtype)) == 0.0
    for got, want in zip(distributed.logits, single.logits, strict=True):
        assert torch.equal(got, want), (got - want).abs().max()


def test_world_must_equal_tp(tp2_dirs):
    # No process group: a world of one cannot hold a TP2 checkpoint's ranks one per process.
    with pytest.raises(UserError, match="tp equal to the world size"):
        DistributedExecutor(tp2_dirs / "fp32")


def test_tolerance_grows_with_reordered_adds():
    assert logits_tolerance(4, 4, torch.float32) == 9 * 2 * 2.0**-24
    assert logits_tolerance(4, 8, torch.bfloat16) > logits_tolerance(4, 4, torch.bfloat16)


def test_multicast_stays_off_and_backend_follows_device():
    env = {"NCCL_NVLS_ENABLE": "1"}
    keep_multicast_off(env)
    assert env == NO_MULTICAST_ENV
    assert backend_for("cuda:1") == "nccl" and backend_for("cpu") == "gloo"
    keep_multicast_off()
    assert all(os.environ[k] == v for k, v in NO_MULTICAST_ENV.items())


def test_four_processes_within_the_reordered_sum_bound(tmp_path, mixed_ckpt_fp32):
    """Above TP2 the collective may add the partials in another order than the executor's
    rank order: equal within logits_tolerance, same greedy tokens."""
    directory = tmp_path / "tp4"
    convert_checkpoint(mixed_ckpt_fp32, directory, 4)
    launch_local(
        4, "cpu", tp_decode_worker, (str(directory), PROMPTS, 2, "float32", 1, str(tmp_path))
    )
    distributed = load_run(tmp_path)
    with TrtllmCheckpointExecutor(directory, torch.float32, keep_weights=True) as ex:
        single = decode(ex, PROMPTS, 2)
        bound = logits_tolerance(len(ex.plan.layers), 4, torch.float32)
    assert distributed.tokens == single.tokens
    for got, want in zip(distributed.logits, single.logits, strict=True):
        assert float((got - want).abs().max() / want.abs().max()) <= bound

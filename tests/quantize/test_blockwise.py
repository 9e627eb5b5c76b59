"""Block-by-block calibration of the native nemotron-nas model: parity, empty blocks, resume, DP."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from builder.arch import load_plan
from builder.io.checkpoint import HFCheckpoint
from builder.quantize.blockwise import CalibOptions, calibrate_blockwise, calibrate_model
from builder.quantize.pipeline import reference_parts

# Numeric comparisons run on one torch thread, so summation order does not depend on the
# machine's core count (see one_torch_thread in tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_torch_thread")

WINDOWS = torch.randint(5, 261, (6, 24), generator=torch.Generator().manual_seed(3))


def blockwise(ckpt_dir: Path, **options):
    progress = options.pop("progress", None)
    fingerprint = options.pop("fingerprint", {"test": 1})
    return calibrate_blockwise(
        HFCheckpoint(ckpt_dir),
        load_plan(ckpt_dir),
        reference_parts(ckpt_dir),
        WINDOWS,
        CalibOptions(batch_size=4, **options),
        fingerprint,
        progress,
    )


@pytest.fixture(scope="module")
def mixed_blockwise(mixed_ckpt):
    return blockwise(mixed_ckpt)


def test_blockwise_amax_equals_whole_model(mixed_ckpt, mixed_blockwise):
    from builder.model import load_reference_model

    model = load_reference_model(mixed_ckpt, dtype=torch.bfloat16)
    whole = calibrate_model(model, WINDOWS, kv_cache=True, batch_size=4)
    assert mixed_blockwise.table.values == whole.values
    kinds = {key.rsplit(".", 2)[-2] for key in whole.values}
    assert {"q_proj", "linear_attn", "linear_mlp", "down_proj", "self_attn"} <= kinds


def test_empty_blocks_cost_nothing(mixed_ckpt, mixed_blockwise):
    plan = load_plan(mixed_ckpt)
    empty = [layer.index for layer in plan.empty_layers]
    assert empty and mixed_blockwise.skipped_empty == len(empty)
    assert not set(empty) & set(mixed_blockwise.calibrated)
    assert not set(empty) & set(mixed_blockwise.block_seconds)
    assert all(
        f"model.layers.{i}." not in key for i in empty for key in mixed_blockwise.table.values
    )


def test_ultra_pattern_without_kv_cache(ultra_ckpt):
    plan = load_plan(ultra_ckpt)
    result = blockwise(ultra_ckpt, kv_cache=False)
    assert result.skipped_empty == len(plan.empty_layers) > 0
    assert len(result.calibrated) == plan.num_layers - len(plan.empty_layers)
    assert not any("bmm" in key for key in result.table.values)


class Interrupt(Exception):
    pass


def test_resume_continues_from_saved_blocks(tmp_path, mixed_ckpt, mixed_blockwise):
    state = tmp_path / "state"

    def stop_after_four(done, total, layer):
        if done == 4:
            raise Interrupt

    with pytest.raises(Interrupt):
        blockwise(mixed_ckpt, state_dir=state, progress=stop_after_four, save_every=2)
    assert (state / "inputs-rank0.safetensors").is_file()
    resumed = blockwise(mixed_ckpt, state_dir=state, resume=True)
    assert len(resumed.resumed) == 4 and resumed.calibrated
    assert set(resumed.resumed).isdisjoint(resumed.calibrated)
    assert resumed.table.values == mixed_blockwise.table.values
    # Other data or options: the saved state is not reused.
    fresh = blockwise(mixed_ckpt, state_dir=state, resume=True, fingerprint={"test": 2})
    assert fresh.resumed == [] and fresh.table.values == mixed_blockwise.table.values


DP_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch, torch.distributed as dist
    from pathlib import Path
    rank, world = int(sys.argv[1]), int(sys.argv[2])
    ckpt, init, out = sys.argv[3:6]
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.set_num_threads(1)
    from builder.arch import load_plan
    from builder.io.checkpoint import HFCheckpoint
    from builder.quantize.blockwise import CalibOptions, calibrate_blockwise
    from builder.quantize.pipeline import reference_parts
    windows = torch.tensor(json.loads(sys.argv[6]))
    result = calibrate_blockwise(HFCheckpoint(ckpt), load_plan(ckpt), reference_parts(Path(ckpt)),
                                 windows, CalibOptions(batch_size=4))
    Path(out).write_text(json.dumps(result.table.values))
    dist.barrier()  # both ranks tear gloo down together (a lone peer's teardown can abort)
    dist.destroy_process_group()
    """
)


def test_data_parallel_amax_is_all_reduced_max(tmp_path, mixed_ckpt, mixed_blockwise):
    """Two gloo ranks, each with half the windows, end with the single-process table."""
    script = tmp_path / "dp.py"
    script.write_text(DP_SCRIPT)
    init = f"file://{tmp_path / 'rendezvous'}"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(script),
                str(rank),
                "2",
                str(mixed_ckpt),
                init,
                str(tmp_path / f"rank{rank}.json"),
                str(WINDOWS.tolist()),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    import json

    tables = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert tables[0] == tables[1] == mixed_blockwise.table.values
    # Each rank alone saw different data: the max really came from the reduction.
    half = calibrate_model_half(mixed_ckpt)
    assert half != mixed_blockwise.table.values


def calibrate_model_half(ckpt_dir: Path) -> dict[str, float]:
    from builder.model import load_reference_model

    model = load_reference_model(ckpt_dir, dtype=torch.bfloat16)
    return calibrate_model(model, WINDOWS[:4], kv_cache=True, batch_size=4).values  # rank 0


def test_save_policy_counts_blocks_or_time():
    from builder.quantize.blockwise import AUTO_SAVE_BYTES, save_due

    now = __import__("time").perf_counter()
    assert save_due(2, 2, now, 10**12) and not save_due(2, 1, now, 0)
    assert save_due(0, 1, now, AUTO_SAVE_BYTES)  # small activations: after every block
    assert not save_due(0, 5, now, 8 << 30)  # 8 GiB just saved: wait
    assert save_due(0, 1, now - 301, 8 << 30)


def test_resume_after_complete_calibration_skips_it(tmp_path, mixed_ckpt, mixed_blockwise):
    state = tmp_path / "state"
    first = blockwise(mixed_ckpt, state_dir=state)
    assert (state / "amax" / "complete.json").is_file()
    again = blockwise(mixed_ckpt, state_dir=state, resume=True)
    assert (
        again.calibrated == []
        and again.table.values == first.table.values == mixed_blockwise.table.values
    )

"""The unified HF export writes the same bytes with any number of workers, on every path.

Paths: a tensor stored in the export dtype is copied as it is (kernel copies) and a 16-bit
per-tensor FP8 weight goes through quantize_hf's e4m3 table on the mapped bytes; a tensor in
another dtype is read and cast (or quantized by quantize_hf itself); a per-channel weight is
read and quantized by rows. Byte equality with ModelOpt's `export_hf_checkpoint` is in
test_modelopt_parity.py; here workers > 1 must equal workers = 1 byte for byte, with blocks
small enough that several are in flight at once and shards small enough that the workers
run ahead across file boundaries.
"""

from __future__ import annotations

import shutil
import threading

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from builder.arch import load_plan
from builder.errors import UserError
from builder.io.checkpoint import HFCheckpoint
from builder.quantize import export_hf
from builder.quantize.amax import AmaxTable, expected_keys
from builder.quantize.fp8 import hf_e4m3_table, quantize_hf, scale_from_amax

from .test_formats import every_format


def table_for(plan) -> AmaxTable:
    table = AmaxTable(kv_cache=True)
    for layer in plan.layers:
        keys = expected_keys(plan, layer, True)
        table.update({k: 0.05 if k.endswith("weight_quantizer") else 4.0 for k in keys})
    return table


def export(ckpt_dir, out, workers, **options):
    plan = load_plan(ckpt_dir)
    out.mkdir(parents=True)
    written = export_hf.write_unified_hf(
        out, plan, HFCheckpoint(ckpt_dir), table_for(plan), workers=workers, **options
    )
    return {w.path.name: w.digest for w in written}


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(export_hf, "CHUNK_BYTES", 4096)  # many blocks per tensor


@pytest.mark.parametrize(
    "options",
    [
        {},  # bf16 -> bf16: byte copies and table lookups
        {"dtype": torch.float16},  # casts, quantize_hf on the cast weights
        {"recipe": "every"},  # per-tensor, per-channel and BF16 linears
    ],
    ids=["stored-dtype", "cast", "every-format"],
)
def test_workers_write_the_same_bytes_as_one(tmp_path, mixed_ckpt, small_blocks, options):
    if options.get("recipe") == "every":
        options = {"recipe": every_format(load_plan(mixed_ckpt))}
    options["shard_bytes"] = 200_000  # several files
    one = export(mixed_ckpt, tmp_path / "w1", 1, **options)
    assert len(one) > 2
    threads = threading.active_count()
    four = export(mixed_ckpt, tmp_path / "w4", 4, **options)
    assert threading.active_count() == threads  # no export thread outlives the call
    assert four == one
    for name in [*one, "config.json", "hf_quant_config.json", "model.safetensors.index.json"]:
        assert (tmp_path / "w4" / name).read_bytes() == (tmp_path / "w1" / name).read_bytes()


def test_hf_table_is_quantize_hf_on_every_16_bit_value():
    """The table is built in chunks (torch's thread pool stays asleep); every entry must be
    what quantize_hf gives the whole weight of all 65,536 patterns at once."""
    for dtype in (torch.bfloat16, torch.float16):
        every = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(dtype)
        for amax in (0.02, 1.0, 448.0, 3.3e4):
            scale = scale_from_amax(amax)
            expected = quantize_hf(every, scale).view(torch.uint8).numpy()
            assert np.array_equal(hf_e4m3_table(dtype, scale), expected)


def test_a_failing_block_stops_the_export_and_its_threads(tmp_path, mixed_ckpt, small_blocks):
    """A weight that overflows float16, found while a worker casts its last rows, is the
    export's error; no weight file is left behind and no worker thread outlives the call."""
    ckpt = HFCheckpoint(mixed_ckpt)
    name = [n for n in ckpt.names() if n.endswith("mlp.down_proj.weight")][-1]
    shutil.copytree(mixed_ckpt, tmp_path / "src")
    file = HFCheckpoint(tmp_path / "src").info(name).file
    tensors = load_file(file)
    tensors[name][-1, -1] = 99840.0
    save_file(tensors, str(file), metadata={"format": "pt"})
    plan, out = load_plan(mixed_ckpt), tmp_path / "out"
    out.mkdir()
    threads = threading.active_count()
    with pytest.raises(UserError, match=rf"'{name}' holds 99840 .* overflows float16"):
        export_hf.write_unified_hf(
            out, plan, HFCheckpoint(tmp_path / "src"), table_for(plan), torch.float16, workers=4
        )
    assert threading.active_count() == threads
    assert not list(out.glob("*.safetensors"))


def test_auto_workers_follow_cpus_and_available_memory(monkeypatch):
    from builder.quantize import exporters

    def machine(cpus: int, memory: int) -> int:
        monkeypatch.setattr(exporters.os, "sched_getaffinity", lambda pid: set(range(cpus)))
        monkeypatch.setattr(exporters, "available_memory", lambda: memory)
        return exporters.default_workers()

    assert machine(32, 512 << 30) == exporters.MAX_WORKERS
    assert machine(2, 512 << 30) == 2
    assert machine(32, 5 * exporters.WORKER_MEMORY + 1) == 5
    assert machine(32, 1 << 20) == 1


@pytest.mark.parametrize("value", ["0", "many"])
def test_bad_workers_is_one_error_line(tmp_path, mixed_ckpt, value):
    from click.testing import CliRunner

    from builder.cli import main

    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["quantize", str(mixed_ckpt), str(out), "--workers", value])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert lines == [f"error: --workers: expected a count of at least 1 or auto, got '{value}'"]
    assert not out.exists()

"""Bad input: a clear error naming the culprit, exit code 2, nothing that looks complete."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from builder.cli import main
from builder.io import safetensors_stream
from builder.io.checkpoint import INDEX_NAME


def run_convert(src: Path, out: Path, *extra: str):
    return CliRunner().invoke(main, ["convert", str(src), str(out), *extra])


def assert_failed_cleanly(result, out: Path, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert "\nerror: " in "\n" + result.output and "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.output, result.output
    assert not out.exists()
    stage = out.with_name(f".{out.name}.partial")
    if stage.exists():  # may hold finished ranks for --resume, never a finished-looking file
        assert not (stage / "manifest.json").exists()
        assert not list(stage.glob("*.tmp"))


def shard(src: Path) -> Path:
    index = json.loads((src / INDEX_NAME).read_text())
    return src / min(index["weight_map"].values())


def rewrite_shard(src: Path, change) -> None:
    path = shard(src)
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def edit_config(src: Path, **fields) -> None:
    config = json.loads((src / "config.json").read_text())
    config.update(fields)
    (src / "config.json").write_text(json.dumps(config))


def test_missing_shard(tmp_path, mixed_copy):
    name = shard(mixed_copy).name
    shard(mixed_copy).unlink()
    out = tmp_path / "out"
    assert_failed_cleanly(run_convert(mixed_copy, out, "--tp", "2"), out, "shard file(s) missing", name)


def test_index_naming_a_file_outside_the_checkpoint(tmp_path, mixed_copy):
    index = json.loads((mixed_copy / INDEX_NAME).read_text())
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(shard(mixed_copy), outside)
    index["weight_map"] = dict.fromkeys(index["weight_map"], "../elsewhere.safetensors")
    (mixed_copy / INDEX_NAME).write_text(json.dumps(index))
    out = tmp_path / "out"
    assert_failed_cleanly(run_convert(mixed_copy, out, "--tp", "2"), out, "lies outside the checkpoint directory")


def test_truncated_safetensors(tmp_path, mixed_copy):
    path = shard(mixed_copy)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 4096])
    out = tmp_path / "out"
    assert_failed_cleanly(run_convert(mixed_copy, out, "--tp", "2"), out, path.name, "unreadable safetensors")


def test_header_dtype_disagreeing_with_config(tmp_path, mixed_copy):
    rewrite_shard(mixed_copy, lambda t: t.update({"model.norm.weight": t["model.norm.weight"].half()}))
    out = tmp_path / "out"
    assert_failed_cleanly(
        run_convert(mixed_copy, out, "--tp", "2"), out,
        "'model.norm.weight'", "torch.float16", "torch_dtype bfloat16",
    )


def test_header_shape_disagreeing_with_config(tmp_path, mixed_copy):
    config = json.loads((mixed_copy / "config.json").read_text())
    config["block_configs"][0]["ffn"]["ffn_mult"] = 2.0  # width 512 in the config, 256 on disk
    (mixed_copy / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    assert_failed_cleanly(
        run_convert(mixed_copy, out, "--tp", "2"), out,
        "'model.layers.0.mlp.gate_proj.weight'", "[256, 256]", "implies [512, 256]",
    )


def test_missing_and_unused_tensors_are_named(tmp_path, mixed_copy):
    def change(tensors):
        del tensors["model.layers.4.mlp.linear_mlp.weight"]
        tensors["model.layers.5.mlp.up_proj.weight"] = torch.zeros(4, 4, dtype=torch.bfloat16)

    rewrite_shard(mixed_copy, change)
    index = json.loads((mixed_copy / INDEX_NAME).read_text())
    file = shard(mixed_copy).name
    index["weight_map"].pop("model.layers.4.mlp.linear_mlp.weight")
    index["weight_map"]["model.layers.5.mlp.up_proj.weight"] = file
    (mixed_copy / INDEX_NAME).write_text(json.dumps(index))
    out = tmp_path / "out"
    assert_failed_cleanly(
        run_convert(mixed_copy, out, "--tp", "2"), out,
        "'model.layers.4.mlp.linear_mlp.weight' (layer 4) is missing",
        "'model.layers.5.mlp.up_proj.weight'", "is not used by the plan (layer 5)",
    )


@pytest.mark.parametrize("value, shown", [(float("nan"), "nan"), (float("inf"), "inf")])
def test_nan_or_inf_in_a_weight_names_the_tensor(tmp_path, mixed_copy, value, shown):
    def change(tensors):
        tensors["model.layers.11.mlp.up_proj.weight"][4000, 17] = value

    rewrite_shard(mixed_copy, change)
    out = tmp_path / "out"
    assert_failed_cleanly(
        run_convert(mixed_copy, out, "--tp", "2"), out,
        "'model.layers.11.mlp.up_proj.weight'", f"holds {shown}", "row 4000, column 17",
    )


def test_nan_in_a_column_slice_reports_global_column(tmp_path, mixed_copy):
    def change(tensors):
        tensors["model.layers.0.self_attn.o_proj.weight"][3, 200] = float("nan")

    rewrite_shard(mixed_copy, change)
    out = tmp_path / "out"
    assert_failed_cleanly(
        run_convert(mixed_copy, out, "--tp", "2"), out,
        "'model.layers.0.self_attn.o_proj.weight'", "row 3, column 200",
    )


def test_tp_not_dividing_the_heads(tmp_path, mixed_ckpt):
    out = tmp_path / "out"
    assert_failed_cleanly(run_convert(mixed_ckpt, out, "--tp", "3"), out, "num_attention_heads 16 is not divisible by tp 3")


def test_pp_not_dividing_the_layers(tmp_path, mixed_ckpt):
    out = tmp_path / "out"
    assert_failed_cleanly(
        run_convert(mixed_ckpt, out, "--tp", "2", "--pp", "5"), out, "num_hidden_layers 12 is not divisible by pp 5"
    )


def test_tp_larger_than_but_not_a_multiple_of_a_layers_kv_heads(tmp_path, mixed_ckpt):
    """24 heads, layer 0 with 8 KV heads: tp 12 divides the heads but not 8, nor 8 it."""
    src = tmp_path / "src"
    src.mkdir()
    config = json.loads((mixed_ckpt / "config.json").read_text())
    block = config["block_configs"][0]
    block["attention"]["n_heads_in_group"] = 3
    config.update(num_attention_heads=24, head_dim=8, hidden_size=192, num_hidden_layers=1, block_configs=[block])
    (src / "config.json").write_text(json.dumps(config))
    save_file({}, str(src / "model.safetensors"))  # layout is refused before any weight is needed
    out = tmp_path / "out"
    assert_failed_cleanly(
        run_convert(src, out, "--tp", "12"), out,
        "layer 0: 8 KV heads cannot be split over tp 12",
    )


def test_disk_filling_up_during_a_rank(tmp_path, mixed_ckpt, monkeypatch):
    os_module = safetensors_stream.os
    real_write, real_copy, state = os_module.write, os_module.copy_file_range, {"bytes": 0}

    def full_after(limit: int, real):
        def call(*args):
            if state["bytes"] > limit:
                raise OSError(errno.ENOSPC, "No space left on device")
            done = real(*args)
            state["bytes"] += done
            return done

        return call

    # rank 0 (~9.8 MB) completes, rank 1 does not; both the write() and copy_file_range paths
    monkeypatch.setattr(os_module, "write", full_after(12_000_000, real_write))
    monkeypatch.setattr(os_module, "copy_file_range", full_after(12_000_000, real_copy))
    out = tmp_path / "out"
    result = run_convert(mixed_ckpt, out, "--tp", "2", "--json")
    assert_failed_cleanly(result, out, "No space left on device", ".tmp", "rerun with --resume")
    stage = tmp_path / ".out.partial"
    done = sorted(p.name for p in stage.glob("rank*.safetensors"))
    assert done == ["rank0.safetensors"]  # finished before the disk filled: kept for --resume
    monkeypatch.setattr(os_module, "write", real_write)
    monkeypatch.setattr(os_module, "copy_file_range", real_copy)
    result = run_convert(mixed_ckpt, out, "--tp", "2", "--resume", "--json")
    assert result.exit_code == 0, result.output
    statuses = [r["status"] for r in json.loads(result.output)["ranks"]]
    assert statuses == ["kept", "written"]


def test_not_enough_free_disk_space_is_refused_before_writing(tmp_path, mixed_ckpt, monkeypatch):
    from builder.convert import pipeline

    monkeypatch.setattr(pipeline.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    out = tmp_path / "out"
    assert_failed_cleanly(run_convert(mixed_ckpt, out, "--tp", "2"), out, "need", "GiB are free")
    assert not list((tmp_path / ".out.partial").glob("rank*.safetensors*"))


def test_existing_output_is_not_replaced_without_overwrite(tmp_path, mixed_ckpt):
    out = tmp_path / "out"
    out.mkdir()
    result = run_convert(mixed_ckpt, out, "--tp", "2")
    assert result.exit_code == 2 and "already exists" in result.output


def test_failure_in_a_worker_process_keeps_finished_ranks(tmp_path, mixed_copy):
    """NaN in the final norm: only the last pipeline stage's ranks (2, 3) fail, in workers."""

    def change(tensors):
        tensors["model.norm.weight"][7] = float("nan")

    rewrite_shard(mixed_copy, change)
    out = tmp_path / "out"
    result = run_convert(mixed_copy, out, "--tp", "2", "--pp", "2", "--workers", "2", "--json")
    assert_failed_cleanly(result, out, "'model.norm.weight' holds nan at element 7", "finished ranks 0-1")
    assert sorted(p.name for p in (tmp_path / ".out.partial").glob("rank*.safetensors")) == [
        "rank0.safetensors", "rank1.safetensors",
    ]

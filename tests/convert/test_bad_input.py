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
    assert_failed_cleanly(
        run_convert(mixed_copy, out, "--tp", "2"), out, "shard file(s) missing", name
    )


def test_index_naming_a_file_outside_the_checkpoint(tmp_path, mixed_copy):
    index = json.loads((mixed_copy / INDEX_NAME).read_text())
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(shard(mixed_copy), outside)
    index["weight_map"] = dict.fromkeys(index["weight_map"], "../elsewhere.safetensors")
    (mixed_copy / INDEX_NAME).write_text(json.dumps(index))
    out = tmp_path / "out"
    assert_failed_cleanly(
        run_convert(mixed_copy, out, "--tp", "2"), out, "lies outside the checkpoint directory"
    )


def test_truncated_safetensors(tmp_path, mixed_copy):
    path = shard(mixed_copy)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 4096])
    out = tmp_path / "out"
    assert_failed_cleanly(
        run_convert(mixed_copy, out, "--tp", "2"), out, path.name, "unreadable safetensors"
    )


def test_header_dtype_disagreeing_with_config(tmp_path, mixed_copy):
    rewrite_shard(
        mixed_copy, lambda t: t.update({"model.norm.weight": t["model.norm.weight"].half()})
    )
    out = tmp_path / "out"
    assert_failed_cleanly(
        run_convert(mixed_copy, out, "--tp", "2"),
        out,
        "'model.norm.weight'",
        "torch.float16",
        "torch_dtype bfloat16",
    )


def test_header_shape_disagreeing_with_config(tmp_path, mixed_copy):
    config = json.loads((mixed_copy / "config.json").read_text())
    config["block_configs"][0]["ffn"]["ffn_mult"] = 2.0  # width 512 in the config, 256 on disk
    (mixed_copy / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    assert_failed_cleanly(
        run_convert(mixed_copy, out, "--tp", "2"),
        out,
        "'model.layers.0.mlp.gate_proj.weight'",
        "[256, 256]",
        "implies [512, 256]",
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
        run_convert(mixed_copy, out, "--tp", "2"),
        out,
        "'model.layers.4.mlp.linear_mlp.weight' (layer 4) is missing",
        "'model.layers.5.mlp.up_proj.weight'",
        "is not used by the plan (layer 5)",
    )


@pytest.mark.parametrize(
    "value, shown", [(float("nan"), "nan"), (float("inf"), "inf"), (float("-inf"), "-inf")]
)
def test_nan_or_inf_in_a_weight_names_the_tensor(tmp_path, mixed_copy, value, shown):
    def change(tensors):
        tensors["model.layers.11.mlp.up_proj.weight"][4000, 17] = value

    rewrite_shard(mixed_copy, change)
    out = tmp_path / "out"
    assert_failed_cleanly(
        run_convert(mixed_copy, out, "--tp", "2"),
        out,
        "'model.layers.11.mlp.up_proj.weight'",
        f"holds {shown}",
        "row 4000, column 17",
    )


def test_nan_in_a_column_slice_reports_global_column(tmp_path, mixed_copy):
    def change(tensors):
        tensors["model.layers.0.self_attn.o_proj.weight"][3, 200] = float("nan")

    rewrite_shard(mixed_copy, change)
    out = tmp_path / "out"
    assert_failed_cleanly(
        run_convert(mixed_copy, out, "--tp", "2"),
        out,
        "'model.layers.0.self_attn.o_proj.weight'",
        "row 3, column 200",
    )


def test_tp_not_dividing_the_heads(tmp_path, mixed_ckpt):
    out = tmp_path / "out"
    assert_failed_cleanly(
        run_convert(mixed_ckpt, out, "--tp", "3"),
        out,
        "num_attention_heads 16 is not divisible by tp 3",
    )


def test_pp_not_dividing_the_layers(tmp_path, mixed_ckpt):
    out = tmp_path / "out"
    assert_failed_cleanly(
        run_convert(mixed_ckpt, out, "--tp", "2", "--pp", "5"),
        out,
        "num_hidden_layers 12 is not divisible by pp 5",
    )


def test_tp_larger_than_but_not_a_multiple_of_a_layers_kv_heads(tmp_path, mixed_ckpt):
    """24 heads, layer 0 with 8 KV heads: tp 12 divides the heads but not 8, nor 8 it."""
    src = tmp_path / "src"
    src.mkdir()
    config = json.loads((mixed_ckpt / "config.json").read_text())
    block = config["block_configs"][0]
    block["attention"]["n_heads_in_group"] = 3
    config.update(
        num_attention_heads=24,
        head_dim=8,
        hidden_size=192,
        num_hidden_layers=1,
        block_configs=[block],
    )
    (src / "config.json").write_text(json.dumps(config))
    save_file({}, str(src / "model.safetensors"))  # layout is refused before any weight is needed
    out = tmp_path / "out"
    assert_failed_cleanly(
        run_convert(src, out, "--tp", "12"),
        out,
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

    monkeypatch.setattr(
        pipeline.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000)
    )
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
    assert_failed_cleanly(
        result, out, "'model.norm.weight' holds nan at element 7", "finished ranks 0-1"
    )
    assert sorted(p.name for p in (tmp_path / ".out.partial").glob("rank*.safetensors")) == [
        "rank0.safetensors",
        "rank1.safetensors",
    ]


# ---- hardening: every bad input is one `error:` line, exit 2, and the source is untouched ----
def one_error_line(result) -> str:
    """The single `error:` line on stderr of a failed run (exit 2, no traceback); progress
    lines may precede it."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    return errors[0]


def tree_hash(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` by relative path (links followed): equal before
    and after means nothing was modified, added or deleted."""
    import hashlib

    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _block(index: int, part: str | None, **fields):
    """Set `fields` in block_configs[index] (part None) or in its attention/ffn entry."""

    def change(config):
        block = config["block_configs"][index]
        (block if part is None else block[part]).update(fields)

    return change


BAD_CONFIGS = {
    "not an object": (lambda c: None, "config.json: expected an object, got an array of 1"),
    "numeric field as a string": (
        lambda c: c.update(hidden_size="256"),
        'config.json: hidden_size: expected integer >= 1, got "256"',
    ),
    "zero attention heads": (
        lambda c: c.update(num_attention_heads=0),
        "config.json: num_attention_heads: expected integer >= 1, got 0",
    ),
    "rope_scaling of the wrong type": (
        lambda c: c.update(rope_scaling=[8.0]),
        "config.json: rope_scaling: expected an object, got an array of 1",
    ),
    "attention entry as a string": (
        _block(3, None, attention="no_op"),
        'config.json: block_configs[3].attention: expected an object, got "no_op"',
    ),
    "ffn entry as a string": (
        _block(2, None, ffn="linear"),
        'config.json: block_configs[2].ffn: expected an object, got "linear"',
    ),
    "n_heads_in_group as a string": (
        _block(0, "attention", n_heads_in_group="8"),
        'config.json: block_configs[0].attention.n_heads_in_group: expected integer >= 1, got "8"',
    ),
    "unknown key in a block_configs entry": (
        _block(4, None, kind="mamba"),
        "config.json: block_configs[4].kind: unknown field",
    ),
    "unknown key inside an attention entry": (
        _block(4, "attention", kind="mamba"),
        "config.json: block_configs[4].attention.kind: unknown field",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_is_one_error_line_naming_the_field(tmp_path, mixed_copy, case):
    change, message = BAD_CONFIGS[case]
    if case == "not an object":
        (mixed_copy / "config.json").write_text(
            json.dumps([json.loads((mixed_copy / "config.json").read_text())])
        )
    else:
        edit_json(mixed_copy / "config.json", change)
    before = tree_hash(mixed_copy)
    out = tmp_path / "out"
    line = one_error_line(run_convert(mixed_copy, out, "--tp", "2"))
    assert message in line and str(mixed_copy / "config.json") in line
    assert_failed_cleanly(run_convert(mixed_copy, out, "--tp", "2"), out)
    assert not (tmp_path / ".out.partial").exists()
    assert tree_hash(mixed_copy) == before


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda i: i.update(weight_map=["model-00001.safetensors"]),
            "weight_map: expected an object, got an array",
        ),
        (
            lambda i: i["weight_map"].update({"model.norm.weight": 3}),
            'weight_map["model.norm.weight"]: expected non-empty string, got 3',
        ),
        (lambda i: i.pop("weight_map"), "required field 'weight_map' is missing"),
    ],
    ids=["weight_map not an object", "non-string value", "weight_map missing"],
)
def test_bad_index_is_one_error_line_naming_the_field(tmp_path, mixed_copy, change, message):
    edit_json(mixed_copy / INDEX_NAME, change)
    out = tmp_path / "out"
    line = one_error_line(run_convert(mixed_copy, out, "--tp", "2"))
    assert str(mixed_copy / INDEX_NAME) in line and message in line
    assert not out.exists() and not (tmp_path / ".out.partial").exists()


# ---- where OUT may be ------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["the source", "the source's parent", "inside the source"])
@pytest.mark.parametrize("dry_run", [False, True], ids=["convert", "dry-run"])
def test_output_over_the_input_is_refused_and_the_source_kept(tmp_path, mixed_copy, where, dry_run):
    out = {
        "the source": mixed_copy,
        "the source's parent": tmp_path,
        "inside the source": mixed_copy / "trt",
    }[where]
    before = tree_hash(tmp_path)
    extra = ["--dry-run"] if dry_run else []
    line = one_error_line(run_convert(mixed_copy, out, "--tp", "2", "--overwrite", *extra))
    relation = {
        "the source": "is the input",
        "the source's parent": "contains the input",
        "inside the source": "lies inside the input",
    }[where]
    assert f"the output {relation} {mixed_copy}" in line
    assert tree_hash(tmp_path) == before  # nothing written, nothing deleted
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_output_that_is_a_regular_file_is_not_replaced(tmp_path, mixed_ckpt):
    out = tmp_path / "out"
    out.write_text("my notes")
    line = one_error_line(run_convert(mixed_ckpt, out, "--tp", "2", "--overwrite"))
    assert f"{out}: is a file, not a directory" in line
    assert out.read_text() == "my notes" and not (tmp_path / ".out.partial").exists()


@pytest.fixture
def read_only_dir(tmp_path, monkeypatch):
    """A directory on which creating anything fails with EROFS, as on a read-only mount.

    Permission bits do not stop root, so creation is refused at os.mkdir (the first thing
    a run creates is its staging directory); the mode is set too for non-root runs.
    """
    import os

    ro = tmp_path / "ro"
    ro.mkdir()
    real_mkdir = os.mkdir

    def mkdir(path, *args, **kwargs):
        if Path(path).absolute().is_relative_to(ro):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    ro.chmod(0o555)
    yield ro
    ro.chmod(0o755)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_output_on_a_read_only_filesystem(read_only_dir, mixed_ckpt, workers):
    out = read_only_dir / "out"
    line = one_error_line(run_convert(mixed_ckpt, out, "--tp", "2", "--workers", workers))
    assert line == f"error: {read_only_dir / '.out.partial'}: Read-only file system"
    assert not list(read_only_dir.iterdir())


# ---- resume records and casts -------------------------------------------------------------------
@pytest.mark.parametrize(
    "record",
    [
        '{"rank": 0, "file": "rank0.safetensors", "size": "big"',
        "[1, 2, 3]",
        json.dumps(
            {
                "rank": 0,
                "file": "rank0.safetensors",
                "size": "9",
                "sha256": "x",
                "tensors": 1,
                "layout": {},
                "source_fingerprint": "x",
            }
        ),
        json.dumps(
            {
                "rank": 0,
                "file": "../../elsewhere",
                "size": 1,
                "sha256": "x",
                "tensors": 1,
                "layout": {},
                "source_fingerprint": "x",
            }
        ),
    ],
    ids=["truncated", "not an object", "size as a string", "file outside the stage"],
)
def test_corrupted_resume_record_redoes_the_rank(tmp_path, mixed_ckpt, record):
    """A record is only a shortcut: one that cannot be read or does not fit is ignored and
    its rank converted again; the result equals a fresh conversion byte for byte."""
    fresh = tmp_path / "fresh"
    assert run_convert(mixed_ckpt, fresh, "--tp", "2").exit_code == 0
    out = tmp_path / "out"
    assert run_convert(mixed_ckpt, out, "--tp", "2", "--ranks", "0").exit_code == 0  # rank 1 left
    (tmp_path / ".out.partial" / "ranks" / "rank0.json").write_text(record)
    result = run_convert(mixed_ckpt, out, "--tp", "2", "--resume", "--json")
    assert result.exit_code == 0, result.output
    assert [r["status"] for r in json.loads(result.stdout)["ranks"]] == ["written", "written"]
    assert tree_hash(out) == tree_hash(fresh) | {"manifest.json": tree_hash(out)["manifest.json"]}


def _set_value(tensor: torch.Tensor, value: float) -> torch.Tensor:
    tensor[3, 5] = value
    return tensor


def _tiny_tensor(tensor: torch.Tensor, value: float) -> torch.Tensor:
    """A tensor of 1e-7 (a float16 subnormal) holding one value that flushes to zero."""
    tensor.fill_(1e-7)
    tensor[3, 5] = value
    return tensor


@pytest.mark.parametrize(
    ("edit", "value", "message"),
    [
        (
            _set_value,
            99840.0,
            "holds 99840 at row 3, column 5, which overflows float16 (largest 65504)",
        ),
        (
            _tiny_tensor,
            2.5e-8,
            "at row 3, column 5, which becomes 0 in float16 (smallest non-zero 5.96046e-08)",
        ),
    ],
    ids=["overflow", "underflow"],
)
def test_cast_that_changes_a_weight_is_an_error(tmp_path, mixed_copy, edit, value, message):
    """Overflow to Inf is always an error. Flushing to zero is one when the lost value is
    larger than the rounding error the cast makes anyway on that block's largest values:
    a lone 2e-8 among weights of 0.02 (every real checkpoint has some) is rounding, a tensor
    whose values all flush to zero is destroyed."""

    def change(tensors):
        edit(tensors["model.layers.0.mlp.down_proj.weight"], value)

    rewrite_shard(mixed_copy, change)
    out = tmp_path / "out"
    line = one_error_line(run_convert(mixed_copy, out, "--tp", "2", "--dtype", "float16"))
    assert "'model.layers.0.mlp.down_proj.weight'" in line and message in line
    assert not out.exists()
    assert (
        run_convert(mixed_copy, out, "--tp", "2", "--dtype", "float32").exit_code == 0
    )  # widening is exact


# ---- layouts ---------------------------------------------------------------------------------
def hub_cache_copy(src: Path, cache: Path, link_outside: Path | None = None) -> Path:
    """`src` laid out as huggingface_hub caches it: models--ORG--NAME/snapshots/REV/* are
    relative symlinks to ../../blobs/SHA256. `link_outside`: one shard instead links there."""
    import hashlib

    repo = cache / "models--nvidia--mixed"
    snapshot = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    for file in sorted(src.iterdir()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(Path("../../blobs") / blob.name)
    if link_outside is not None:
        (snapshot / shard(src).name).unlink()
        (snapshot / shard(src).name).symlink_to(link_outside)
    return snapshot


def test_hub_cache_layout_is_accepted(tmp_path, mixed_ckpt):
    snapshot = hub_cache_copy(mixed_ckpt, tmp_path / "hub")
    out, plain = tmp_path / "out", tmp_path / "plain"
    result = run_convert(snapshot, out, "--tp", "2")
    assert result.exit_code == 0, result.output
    assert run_convert(mixed_ckpt, plain, "--tp", "2").exit_code == 0
    assert (out / "rank1.safetensors").read_bytes() == (plain / "rank1.safetensors").read_bytes()


def test_hub_cache_link_leaving_the_repository_is_refused(tmp_path, mixed_ckpt):
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(shard(mixed_ckpt), outside)
    snapshot = hub_cache_copy(mixed_ckpt, tmp_path / "hub", link_outside=outside)
    out = tmp_path / "out"
    line = one_error_line(run_convert(snapshot, out, "--tp", "2"))
    assert "lies outside the checkpoint directory" in line and str(outside) in line


def test_pickle_refusal_names_a_flag_that_exists(tmp_path, mixed_ckpt):
    """The refusal says --allow-pickle; convert has it, and with it reads the same weights."""
    src = tmp_path / "pickled"
    src.mkdir()
    shutil.copy(mixed_ckpt / "config.json", src / "config.json")
    tensors = {}
    for file in sorted(mixed_ckpt.glob("*.safetensors")):
        tensors.update(load_file(file))
    torch.save(tensors, src / "pytorch_model.bin")
    out, plain = tmp_path / "out", tmp_path / "plain"
    line = one_error_line(run_convert(src, out, "--tp", "2"))
    assert "pytorch_model.bin" in line and "--allow-pickle" in line
    result = run_convert(src, out, "--tp", "2", "--allow-pickle", "--workers", "2")
    assert result.exit_code == 0, result.output
    assert run_convert(mixed_ckpt, plain, "--tp", "2").exit_code == 0
    assert (out / "rank0.safetensors").read_bytes() == (plain / "rank0.safetensors").read_bytes()


def test_nan_in_a_column_slice_of_an_fp8_export_reports_global_column(tmp_path, mixed_copy):
    """The FP8 export streams column slices as strided views through its e4m3 table; the
    NaN scan on those views reports the same position as the plain conversion."""
    from builder.arch import load_plan
    from builder.errors import UserError
    from builder.quantize.amax import AmaxTable, expected_keys
    from builder.quantize.export_trtllm import write_trtllm_fp8

    def change(tensors):
        tensors["model.layers.0.self_attn.o_proj.weight"][3, 200] = float("nan")

    rewrite_shard(mixed_copy, change)
    table = AmaxTable(kv_cache=False)
    for layer in load_plan(mixed_copy).layers:
        keys = expected_keys(load_plan(mixed_copy), layer, False)
        table.update({k: 0.05 if k.endswith("weight_quantizer") else 4.0 for k in keys})
    with pytest.raises(UserError) as raised:
        write_trtllm_fp8(mixed_copy, tmp_path / "out", table, tp=2)
    assert "'model.layers.0.self_attn.o_proj.weight'" in str(raised.value)
    assert "row 3, column 200" in str(raised.value)
    assert not (tmp_path / "out").exists()

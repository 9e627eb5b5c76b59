"""Staging, --resume, --ranks (several hosts), --workers, and `builder check`."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from builder.cli import main
from builder.convert import convert_checkpoint
from builder.convert.roundtrip import roundtrip_problems


def cli(*args: str):
    return CliRunner().invoke(main, [*map(str, args)])


def statuses(result) -> list[str]:
    assert result.exit_code == 0, result.output
    return [r["status"] for r in json.loads(result.output)["ranks"]]


def flip_byte(path: Path, offset: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_two_hosts_split_one_job_and_the_last_one_finalizes(tmp_path, mixed_ckpt):
    out = tmp_path / "out"
    stage = tmp_path / ".out.partial"
    first = cli("convert", mixed_ckpt, out, "--tp", 4, "--ranks", "0-1", "--json")
    assert statuses(first) == ["written", "written", "pending", "pending"]
    assert not out.exists() and sorted(p.name for p in stage.glob("rank*.safetensors")) == [
        "rank0.safetensors",
        "rank1.safetensors",
    ]
    partial = cli("check", stage)
    assert partial.exit_code == 2 and "2 of 4 ranks done; missing [2, 3]" in partial.output
    second = cli("convert", mixed_ckpt, out, "--tp", 4, "--ranks", "2-3", "--json")
    assert statuses(second) == ["present", "present", "written", "written"]
    assert json.loads(second.output)["complete"] and not stage.exists()
    assert cli("check", out, "--source", mixed_ckpt).exit_code == 0
    assert roundtrip_problems(out, mixed_ckpt) == []


def test_resume_keeps_verified_ranks_and_redoes_corrupt_ones(tmp_path, mixed_ckpt):
    out = tmp_path / "out"
    stage = tmp_path / ".out.partial"
    statuses(cli("convert", mixed_ckpt, out, "--tp", 4, "--ranks", "0-2", "--json"))
    flip_byte(stage / "rank1.safetensors")  # same size, different bytes: only the digest sees it
    resumed = cli("convert", mixed_ckpt, out, "--tp", 4, "--resume", "--json")
    assert statuses(resumed) == ["kept", "written", "kept", "written"]
    assert cli("check", out).exit_code == 0
    assert roundtrip_problems(out, mixed_ckpt) == []


def test_resume_redoes_ranks_of_a_different_layout(tmp_path, mixed_ckpt):
    out = tmp_path / "out"
    statuses(cli("convert", mixed_ckpt, out, "--tp", 2, "--ranks", "0", "--json"))
    resumed = cli("convert", mixed_ckpt, out, "--tp", 2, "--dtype", "float32", "--resume", "--json")
    assert statuses(resumed) == ["written", "written"]


def test_without_resume_a_stale_staging_directory_is_discarded(tmp_path, mixed_ckpt):
    out = tmp_path / "out"
    statuses(cli("convert", mixed_ckpt, out, "--tp", 2, "--ranks", "0", "--json"))
    assert statuses(cli("convert", mixed_ckpt, out, "--tp", 2, "--json")) == ["written", "written"]


def test_parallel_workers_write_identical_files(tmp_path, ultra_ckpt):
    one, two = tmp_path / "one", tmp_path / "two"
    convert_checkpoint(ultra_ckpt, one, tp=4)
    summary = convert_checkpoint(ultra_ckpt, two, tp=4, workers=2)
    assert [r.status for r in summary.ranks] == ["written"] * 4
    for rank in range(4):
        name = f"rank{rank}.safetensors"
        assert (one / name).read_bytes() == (two / name).read_bytes()
    manifest = json.loads((two / "manifest.json").read_text())
    assert (
        manifest["files"][name]["blake3"]
        == json.loads((one / "manifest.json").read_text())["files"][name]["blake3"]
    )


def test_manifest_records_what_the_issue_asks_for(tmp_path, mixed_ckpt):
    out = tmp_path / "out"
    convert_checkpoint(mixed_ckpt, out, tp=2, pp=2)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "trtllm-checkpoint" and manifest["complete"] is True
    assert manifest["tool"]["name"] == "builder" and manifest["tool"]["version"]
    assert manifest["layout"] == {
        "tp": 2,
        "pp": 2,
        "world_size": 4,
        "dtype": "bfloat16",
        "quantization": {"quant_algo": None, "kv_cache_quant_algo": None},
    }
    assert (
        len(manifest["source"]["fingerprint"]) == 64
        and "header" in manifest["source"]["fingerprint_method"]
    )
    assert set(manifest["files"]) == {"config.json"} | {f"rank{r}.safetensors" for r in range(4)}
    assert [r["tensors"] for r in manifest["ranks"]] == [
        len(r["tensor_specs"]) for r in manifest["ranks"]
    ]
    assert sorted(p.name for p in out.iterdir()) == sorted([*manifest["files"], "manifest.json"])


class TestCheck:
    def converted(self, tmp_path, mixed_ckpt) -> Path:
        out = tmp_path / "out"
        convert_checkpoint(mixed_ckpt, out, tp=2)
        return out

    def test_a_good_checkpoint_passes(self, tmp_path, mixed_ckpt):
        result = cli(
            "check", self.converted(tmp_path, mixed_ckpt), "--source", mixed_ckpt, "--roundtrip"
        )
        assert result.exit_code == 0 and "round trip bit-exact" in result.output

    def test_corrupt_missing_and_extra_files(self, tmp_path, mixed_ckpt):
        out = self.converted(tmp_path, mixed_ckpt)
        flip_byte(out / "rank0.safetensors")
        (out / "rank1.safetensors").unlink()
        (out / "notes.txt").write_text("hi")
        result = cli("check", out, "--json")
        assert result.exit_code == 2
        problems = "\n".join(json.loads(result.stdout)["problems"])
        assert "rank0.safetensors: blake3 differs" in problems
        assert "rank1.safetensors: listed in the manifest but missing" in problems
        assert "notes.txt: not listed in the manifest" in problems
        assert (
            cli("check", out, "--quick").exit_code == 2
        )  # the missing file is seen without hashing

    def test_header_that_disagrees_with_the_plan(self, tmp_path, mixed_ckpt):
        from safetensors.torch import load_file, save_file

        from builder.io.manifest import file_entry

        out = self.converted(tmp_path, mixed_ckpt)
        tensors = load_file(out / "rank1.safetensors")
        tensors["transformer.layers.0.attention.qkv_renamed.weight"] = tensors.pop(
            "transformer.layers.0.attention.qkv.weight"
        )
        tensors["transformer.ln_f.weight"] = tensors["transformer.ln_f.weight"].float()
        save_file(tensors, str(out / "rank1.safetensors"))
        manifest = json.loads((out / "manifest.json").read_text())
        manifest["files"]["rank1.safetensors"] = file_entry(
            out / "rank1.safetensors"
        )  # hashes agree
        (out / "manifest.json").write_text(json.dumps(manifest))
        result = cli("check", out)
        assert result.exit_code == 2
        assert "tensor 'transformer.layers.0.attention.qkv.weight' is missing" in result.output
        assert (
            "'transformer.layers.0.attention.qkv_renamed.weight' is not expected" in result.output
        )
        assert "'transformer.ln_f.weight' is [256] F32, the plan says [256] BF16" in result.output

    def test_other_source_is_detected(self, tmp_path, mixed_ckpt, ultra_ckpt):
        result = cli("check", self.converted(tmp_path, mixed_ckpt), "--source", ultra_ckpt)
        assert result.exit_code == 2 and "differs from the one recorded" in result.output

    def test_a_dry_run_is_not_a_checkpoint(self, tmp_path):
        out = tmp_path / "plan"
        assert cli("convert", "--preset", "mixed", "--tp", 2, "--dry-run", out).exit_code == 0
        result = cli("check", out)
        assert result.exit_code == 2 and "--dry-run manifest" in result.output


def test_a_checkpoint_with_an_older_sha256_manifest_checks_and_resumes(tmp_path, mixed_ckpt):
    """Artifacts written before BLAKE3 ({"size", "sha256"} entries, in manifest.json and in the
    stage's rank records) still verify, and corruption is still caught."""
    import hashlib

    def to_sha256(entry: dict, path: Path) -> None:
        del entry["blake3"]
        entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()

    out = tmp_path / "out"
    statuses(cli("convert", mixed_ckpt, out, "--tp", 2, "--json"))
    manifest = json.loads((out / "manifest.json").read_text())
    for name, entry in manifest["files"].items():
        to_sha256(entry, out / name)
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert cli("check", out, "--source", mixed_ckpt).exit_code == 0
    flip_byte(out / "rank1.safetensors")
    result = cli("check", out)
    assert result.exit_code == 2 and "rank1.safetensors: sha256 differs" in result.output

    again, stage = tmp_path / "again", tmp_path / ".again.partial"
    statuses(cli("convert", mixed_ckpt, again, "--tp", 2, "--ranks", "0", "--json"))
    record_path = stage / "ranks" / "rank0.json"
    record = json.loads(record_path.read_text())
    to_sha256(record, stage / "rank0.safetensors")
    record_path.write_text(json.dumps(record))
    resumed = cli("convert", mixed_ckpt, again, "--tp", 2, "--resume", "--json")
    assert statuses(resumed) == ["kept", "written"]
    entries = json.loads((again / "manifest.json").read_text())["files"].values()
    assert all(set(entry) == {"size", "blake3"} for entry in entries)  # one algorithm
    assert cli("check", again).exit_code == 0

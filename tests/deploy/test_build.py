"""`builder build`: checks against the target, the dry run, the TensorRT-LLM gate, the PyTorch
path."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import yaml
from click.testing import CliRunner

from builder.cli import main
from builder.deploy import (
    TrtllmUnavailable,
    arg_problems,
    build_engines,
    dry_run_build,
    load_profile,
    trtllm_status,
    write_pytorch_serve,
)
from builder.deploy.engine import run_logged
from builder.deploy.inputs import InputError
from builder.deploy.pytorch import llm_api_options
from builder.io.manifest import read_manifest, verify_files

BF16_TP2 = [("parallel.tp", 2)]
DRY_RUN_FILES = {
    "trtllm-build.sh",
    "build_config.json",
    "build_report.json",
    "plan.json",
    "manifest.json",
    "launch/build-engines.sh",
    "launch/build-engines-mpirun.sh",
    "launch/serve.sh",
    "launch/serve-mpirun.sh",
    "launch/serve-slurm.sh",
}


def bf16_target(**more):
    return load_profile("h100x8-bf16", BF16_TP2 + list(more.items()))


def fp8_target():
    return load_profile("h100x4-fp8", BF16_TP2)


def bash_syntax_ok(path):
    return (
        subprocess.run(["bash", "-n", str(path)], check=False, capture_output=True).returncode == 0
    )


# ---- dry run -------------------------------------------------------------------------------------
def test_dry_run_output_is_complete(trtllm_bf16, tmp_path):
    out = tmp_path / "dry"
    result = dry_run_build(trtllm_bf16, bf16_target(), out)
    assert {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} == DRY_RUN_FILES
    assert set(result.files) == DRY_RUN_FILES
    assert not list(out.rglob("*.engine"))
    report = json.loads((out / "build_report.json").read_text())
    assert report["engine_built"] is False and report["dry_run"] is True
    assert report["verification"]["digests"].startswith("ok")
    assert report["checkpoint"]["tp"] == 2 and report["fits"] is True
    command = report["command"]
    assert command[0] == "trtllm-build" and arg_problems(command[1:]) == []
    assert command[command.index("--checkpoint_dir") + 1] == str(trtllm_bf16.resolve())
    script = (out / "trtllm-build.sh").read_text()
    for arg in command[1:]:
        assert arg in script
    config = json.loads((out / "build_config.json").read_text())
    assert config["trtllm_build"]["flag_set"]["release"] == "1.2.1"
    assert config["target"]["parallel"]["tp"] == 2
    plan = json.loads((out / "plan.json").read_text())
    assert plan["fits"] and plan["per_rank"][0]["tensors"] > 0
    manifest = read_manifest(out)
    assert manifest["kind"] == "trtllm-build-dry-run" and manifest["engine_built"] is False
    assert verify_files(out, manifest) == []
    for name in DRY_RUN_FILES - {
        "build_config.json",
        "build_report.json",
        "plan.json",
        "manifest.json",
    }:
        assert bash_syntax_ok(out / name), name


def test_dry_run_of_fp8_checkpoint_uses_fp8_flags(trtllm_fp8, tmp_path):
    result = dry_run_build(trtllm_fp8, fp8_target(), tmp_path / "dry")
    command = result.report["command"]
    assert command[command.index("--gemm_plugin") + 1] == "fp8"
    assert command[command.index("--use_fp8_context_fmha") + 1] == "enable"
    assert result.report["checkpoint"]["quant_algo"] == "FP8"


def test_multinode_scripts_use_mpi(trtllm_bf16, tmp_path):
    out = tmp_path / "dry"
    dry_run_build(trtllm_bf16, bf16_target(), out)
    mpirun = (out / "launch" / "serve-mpirun.sh").read_text()
    assert "mpirun" in mpirun and "-np 2" in mpirun and "trtllm-llmapi-launch" in mpirun
    slurm = (out / "launch" / "serve-slurm.sh").read_text()
    assert "srun" in slurm and "--mpi=pmix" in slurm and "--ntasks=2" in slurm
    build_mpi = (out / "launch" / "build-engines-mpirun.sh").read_text()
    assert "trtllm-build" in build_mpi and "--workers 1" in build_mpi


# ---- refusals ------------------------------------------------------------------------------------
def test_refuses_tp_mismatch(trtllm_bf16, tmp_path):
    out = tmp_path / "dry"
    with pytest.raises(
        InputError, match=r"mapping\.tp_size is 2 but target h100x8-bf16 .* parallel\.tp = 8"
    ):
        dry_run_build(trtllm_bf16, load_profile("h100x8-bf16"), out)
    assert not out.exists()


def test_refuses_quantization_mismatch(trtllm_bf16, trtllm_fp8, tmp_path):
    with pytest.raises(
        InputError, match=r"quant_algo is None but target h100x4-fp8 .*precision\.weights = 'fp8'"
    ):
        dry_run_build(trtllm_bf16, fp8_target(), tmp_path / "a")
    with pytest.raises(
        InputError,
        match=r"quant_algo is 'FP8' but target h100x8-bf16 .*precision\.weights = 'bf16'",
    ):
        dry_run_build(trtllm_fp8, bf16_target(), tmp_path / "b")
    kv_only = load_profile(
        "h100x4-fp8",
        BF16_TP2 + [("precision.kv_cache", "bf16"), ("build.use_fp8_context_fmha", False)],
    )
    with pytest.raises(
        InputError, match=r"kv_cache_quant_algo is 'FP8' but .*precision\.kv_cache = 'bf16'"
    ):
        dry_run_build(trtllm_fp8, kv_only, tmp_path / "c")


def test_refuses_checksum_mismatch(trtllm_bf16, tmp_path):
    ckpt = shutil.copytree(trtllm_bf16, tmp_path / "ckpt")
    rank = ckpt / "rank1.safetensors"
    data = bytearray(rank.read_bytes())
    data[-1] ^= 0xFF
    rank.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"rank1\.safetensors: blake3 differs"):
        dry_run_build(ckpt, bf16_target(), tmp_path / "dry")
    skipped = dry_run_build(ckpt, bf16_target(), tmp_path / "dry2", verify=False)
    assert skipped.report["verification"]["digests"].startswith("skipped")


def test_refuses_truncated_and_unmanifested_checkpoints(trtllm_bf16, tmp_path):
    ckpt = shutil.copytree(trtllm_bf16, tmp_path / "ckpt")
    (ckpt / "rank0.safetensors").write_bytes(b"")
    with pytest.raises(InputError, match=r"rank0\.safetensors: size 0 != manifest"):
        dry_run_build(ckpt, bf16_target(), tmp_path / "dry", verify=False)
    (ckpt / "manifest.json").unlink()
    with pytest.raises(InputError, match="manifest.json: missing"):
        dry_run_build(ckpt, bf16_target(), tmp_path / "dry")


# ---- the TensorRT-LLM gate -----------------------------------------------------------------------
def test_missing_tensorrt_llm_is_a_clear_error(trtllm_bf16, tmp_path):
    if trtllm_status().usable:
        pytest.skip("TensorRT-LLM is installed here")
    out = tmp_path / "engines"
    with pytest.raises(TrtllmUnavailable) as err:
        build_engines(trtllm_bf16, bf16_target(), out)
    message = str(err.value)
    assert "not installed" in message and "1.2" in message
    assert (
        "pip install 'builder[trtllm]'" in message
        and "nvcr.io/nvidia/tensorrt-llm/release" in message
    )
    assert "--dry-run" in message
    assert not out.exists()


@pytest.mark.parametrize(
    ("version", "reason"),
    [("1.3.0", "too new"), ("1.3.0rc1", "too new"), ("0.17.0.post1", "too old"), ("1.2.1", None)],
)
def test_version_gate(version, reason):
    status = trtllm_status(version=version, importable=True)
    assert status.usable is (reason is None)
    if reason:
        assert reason in status.reason


def test_too_new_tensorrt_llm_refuses_before_any_work(trtllm_bf16, tmp_path):
    status = trtllm_status(version="1.4.0", importable=True)
    with pytest.raises(TrtllmUnavailable, match=r"1\.4\.0 is too new.*1\.2\.x"):
        build_engines(trtllm_bf16, bf16_target(), tmp_path / "e", status=status)


def test_run_logged_streams_and_keeps_the_log(tmp_path):
    lines = []
    code = run_logged(
        [sys.executable, "-c", "print('one'); print('two'); raise SystemExit(3)"],
        tmp_path / "log",
        lines.append,
    )
    assert code == 3 and lines == ["one", "two"]
    assert (tmp_path / "log").read_text() == "one\ntwo\n"


# ---- PyTorch backend -----------------------------------------------------------------------------
def test_pytorch_bf16_options_and_scripts(mixed_ckpt, tmp_path):
    out = tmp_path / "serve"
    profile = bf16_target()
    result = write_pytorch_serve(mixed_ckpt, profile, out)
    options = yaml.safe_load((out / "llm_api_options.yaml").read_text())
    assert options == result.report["options"]
    assert options["tensor_parallel_size"] == 2 and options["pipeline_parallel_size"] == 1
    assert options["kv_cache_config"] == {
        "dtype": "auto",
        "free_gpu_memory_fraction": 0.9,
        "tokens_per_block": 32,
    }
    assert (
        options["max_batch_size"] == 64
        and options["max_seq_len"] == 8192
        and options["dtype"] == "bfloat16"
    )
    assert options["trust_remote_code"] is False
    serve = (out / "launch" / "serve.sh").read_text()
    assert (
        "trtllm-serve" in serve
        and "--extra_llm_api_options" in serve
        and "--backend pytorch" in serve
    )
    assert "trtllm-llmapi-launch" in (out / "launch" / "serve-slurm.sh").read_text()
    assert all(bash_syntax_ok(p) for p in (out / "launch").iterdir())
    assert verify_files(out, read_manifest(out)) == []


def test_pytorch_fp8_export(hf_fp8_dir, tmp_path):
    result = write_pytorch_serve(hf_fp8_dir, fp8_target(), tmp_path / "serve")
    assert result.report["options"]["kv_cache_config"]["dtype"] == "fp8"
    assert result.report["model"]["quant_algo"] == "FP8"
    assert "no manifest" in result.report["verification"]["digests"]


def test_pytorch_refuses_precision_mismatch(mixed_ckpt, hf_fp8_dir, trtllm_bf16, tmp_path):
    with pytest.raises(InputError, match="cannot quantize on load"):
        write_pytorch_serve(mixed_ckpt, fp8_target(), tmp_path / "a")
    with pytest.raises(InputError, match="quant_algo is 'FP8'.*weights = 'bf16'"):
        write_pytorch_serve(hf_fp8_dir, bf16_target(), tmp_path / "b")
    with pytest.raises(InputError, match="TensorRT-LLM checkpoint"):
        write_pytorch_serve(trtllm_bf16, bf16_target(), tmp_path / "c")


def test_pp_partition_only_when_pipelined(mixed_ckpt):
    from builder.deploy.inputs import read_hf_input

    inp = read_hf_input(mixed_ckpt)
    assert "pp_partition" not in llm_api_options(bf16_target(), inp, [6, 6])
    piped = load_profile("h100x8-bf16", [("parallel.tp", 2), ("parallel.pp", 2)])
    assert llm_api_options(piped, inp, [7, 5])["pp_partition"] == [7, 5]


# ---- CLI -----------------------------------------------------------------------------------------
def test_cli_plan_mission_targets_json():
    result = CliRunner().invoke(main, ["plan", "--preset", "ultra-253b", "--json"])
    assert result.exit_code == 0, result.output
    plans = json.loads(result.output)["plans"]
    assert [p["target"]["name"] for p in plans] == ["h100x8-bf16", "h100x4-fp8", "b100x4-fp8"]
    assert all(p["fits"] for p in plans)


def test_cli_plan_overrides_and_errors():
    runner = CliRunner()
    result = runner.invoke(
        main,
        [
            "plan",
            "--preset",
            "ultra-253b",
            "--target",
            "h100x4-fp8",
            "--max-seq-len",
            "16384",
            "--json",
        ],
    )
    assert json.loads(result.output)["plans"][0]["target"]["build"]["max_seq_len"] == 16384
    bad = runner.invoke(main, ["plan", "--preset", "ultra-253b", "--set", "build.bogus=1"])
    assert bad.exit_code == 2 and "build.bogus" in bad.output and "Traceback" not in bad.output
    unknown = runner.invoke(main, ["plan", "--preset", "ultra-253b", "--target", "a100x8"])
    assert unknown.exit_code == 2 and "unknown target 'a100x8'" in unknown.output


def test_cli_build_dry_run_and_missing_trtllm(trtllm_bf16, tmp_path):
    runner = CliRunner()
    dry = runner.invoke(
        main,
        [
            "build",
            str(trtllm_bf16),
            str(tmp_path / "dry"),
            "--target",
            "h100x8-bf16",
            "--tp",
            "2",
            "--dry-run",
            "--json",
        ],
    )
    assert dry.exit_code == 0, dry.output
    assert '"engine_built": false' in dry.output
    if not trtllm_status().usable:
        real = runner.invoke(
            main,
            [
                "build",
                str(trtllm_bf16),
                str(tmp_path / "e"),
                "--target",
                "h100x8-bf16",
                "--tp",
                "2",
            ],
        )
        assert real.exit_code == 2 and "TensorRT-LLM is not installed" in real.output
        assert not (tmp_path / "e").exists()


def test_engine_backend_refuses_an_hf_directory(mixed_ckpt, tmp_path):
    with pytest.raises(InputError, match="not a TensorRT-LLM checkpoint.*--backend pytorch"):
        dry_run_build(mixed_ckpt, bf16_target(), tmp_path / "dry")


def test_demo_api_mission_plans_and_text():
    from builder.deploy import mission_plans, plan_text

    plans = mission_plans()
    assert [p.profile.name for p in plans] == ["h100x8-bf16", "h100x4-fp8", "b100x4-fp8"]
    assert all(p.fits for p in plans)
    assert "fits:" in plan_text(plans[0]) and "62.43" in plan_text(plans[0])

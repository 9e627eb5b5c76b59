"""`builder triton`: repositories generated from build records, for engines and the PyTorch
backend."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from builder.errors import UserError
from builder.triton import TritonOptions, read_build_record, write_repository
from builder.triton.check import check_repository
from builder.triton.repository import MODELS_DIR


def parse(path: Path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.fixture(scope="module")
def engine_repo(tiny_build, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gen") / "engine-repo"
    options = TritonOptions(
        tokenizer_dir=tiny_build.hf_dir, decoupled=True, tokenizer_instances=1, bls_instances=1
    )
    write_repository(read_build_record(tiny_build.build_dir), options, out)
    return out


def test_engine_repository_takes_its_values_from_the_build(engine_repo, tiny_build):
    repo = engine_repo / MODELS_DIR
    assert sorted(p.name for p in repo.iterdir()) == [
        "ensemble",
        "postprocessing",
        "preprocessing",
        "tensorrt_llm",
        "tensorrt_llm_bls",
    ]
    for path in repo.glob("*/config.pbtxt"):
        assert "${" not in path.read_text(), path  # nothing left unfilled
    configs = {p.parent.name: parse(p) for p in repo.glob("*/config.pbtxt")}
    assert {c.max_batch_size for c in configs.values()} == {
        4
    }  # the engine's (build.max_batch_size=4)
    llm = configs["tensorrt_llm"]
    params = {k: v.string_value for k, v in llm.parameters.items()}
    record = json.loads((tiny_build.build_dir / "build_config.json").read_text())
    command = record["trtllm_build"]["command"]
    assert params["gpt_model_path"] == command[command.index("--output_dir") + 1]
    assert params["gpt_model_type"] == "inflight_fused_batching"
    assert params["kv_cache_free_gpu_mem_fraction"] == str(
        record["target"]["runtime"]["kv_cache_free_gpu_mem_fraction"]
    )
    assert params["max_attention_window_size"] == str(record["target"]["build"]["max_seq_len"])
    assert llm.backend == "tensorrtllm" and llm.model_transaction_policy.decoupled
    assert configs["tensorrt_llm_bls"].model_transaction_policy.decoupled
    logits = {t.name: t.data_type for t in llm.output}["context_logits"]
    from tritonclient.grpc import model_config_pb2

    assert (
        model_config_pb2.DataType.Name(logits) == "TYPE_FP32"
    )  # the checkpoint's logits_dtype float32
    tokenizer = {k: v.string_value for k, v in configs["preprocessing"].parameters.items()}[
        "tokenizer_dir"
    ]
    assert tokenizer == str(tiny_build.hf_dir.resolve()) and not Path(tokenizer).is_relative_to(
        engine_repo
    )
    assert re.search(
        r'^WORLD_SIZE="\$\{WORLD_SIZE:-1\}"',
        (engine_repo / "launch" / "serve.sh").read_text(),
        re.MULTILINE,
    )
    manifest = json.loads((engine_repo / "manifest.json").read_text())
    assert (
        manifest["kind"] == "triton-model-repository"
        and f"{MODELS_DIR}/ensemble/config.pbtxt" in manifest["files"]
    )
    assert [f for f in check_repository(engine_repo) if f.is_error] == []


def write_engine_dir(directory: Path, tp: int, pp: int, max_batch_size: int) -> Path:
    """An engine directory's config.json in trtllm-build's format (no rank engines: the
    reader is under test, no engine is pretended)."""
    directory.mkdir(parents=True)
    config = {
        "version": "1.2.1",
        "pretrained_config": {
            "architecture": "DeciLMForCausalLM",
            "dtype": "bfloat16",
            "logits_dtype": "float16",
            "mapping": {"world_size": tp * pp, "tp_size": tp, "pp_size": pp},
        },
        "build_config": {
            "max_batch_size": max_batch_size,
            "max_input_len": 2048,
            "max_seq_len": 4096,
            "max_num_tokens": 8192,
            "max_beam_width": 1,
            "plugin_config": {"tokens_per_block": 64, "paged_kv_cache": True},
        },
    }
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_engine_config_json_sets_world_size_batch_and_logits_dtype(tiny_build, tmp_path):
    engine = write_engine_dir(tmp_path / "engine", tp=2, pp=2, max_batch_size=16)
    record = read_build_record(engine)
    assert (record.world_size, record.max_batch_size, record.logits_dtype) == (4, 16, "float16")
    out = tmp_path / "repo"
    write_repository(record, TritonOptions(tokenizer_dir=tiny_build.hf_dir, max_batch_size=8), out)
    llm = parse(out / MODELS_DIR / "tensorrt_llm" / "config.pbtxt")
    assert llm.max_batch_size == 8 and not llm.model_transaction_policy.decoupled
    from tritonclient.grpc import model_config_pb2

    logits = {t.name: t.data_type for t in llm.output}["generation_logits"]
    assert model_config_pb2.DataType.Name(logits) == "TYPE_FP16"
    for script in ("serve.sh", "serve-mpirun.sh", "serve-slurm.sh", "triton-rank.sh"):
        assert 'WORLD_SIZE="${WORLD_SIZE:-4}"' in (out / "launch" / script).read_text()
    assert '--ntasks="$WORLD_SIZE"' in (out / "launch" / "serve-slurm.sh").read_text()
    assert [f.line() for f in check_repository(out) if f.is_error] == []


def test_max_batch_size_above_the_engine_is_refused(tiny_build, tmp_path):
    with pytest.raises(
        UserError, match=r"--max-batch-size 8: must be 1..4, the engine's built max_batch_size"
    ):
        write_repository(
            read_build_record(tiny_build.build_dir),
            TritonOptions(tokenizer_dir=tiny_build.hf_dir, max_batch_size=8),
            tmp_path / "r",
        )
    assert not (tmp_path / "r").exists()


def test_pytorch_backend_gets_the_llmapi_repository(tiny_build, tmp_path):
    import yaml

    out = tmp_path / "llmapi"
    write_repository(
        read_build_record(tiny_build.pytorch_dir),
        TritonOptions(tokenizer_dir=tiny_build.hf_dir, decoupled=True, kv_fraction=0.8),
        out,
    )
    repo = out / MODELS_DIR
    assert sorted(p.name for p in repo.iterdir()) == ["tensorrt_llm"]
    config = parse(repo / "tensorrt_llm" / "config.pbtxt")
    assert config.backend == "python" and config.max_batch_size == 0
    assert not config.HasField("model_transaction_policy")
    options = yaml.safe_load((repo / "tensorrt_llm" / "1" / "model.yaml").read_text())
    built = json.loads((tiny_build.pytorch_dir / "build_report.json").read_text())["options"]
    assert options["model"] == str(tiny_build.hf_dir.resolve()) and options["backend"] == "pytorch"
    for key in (
        "tensor_parallel_size",
        "pipeline_parallel_size",
        "max_seq_len",
        "max_num_tokens",
        "dtype",
    ):
        assert options[key] == built[key]
    assert options["kv_cache_config"]["free_gpu_memory_fraction"] == 0.8
    assert options["triton_config"] == {"max_batch_size": 0, "decoupled": True}
    # Every option trtllm-serve would get from the build, with only --kv-fraction changed.
    serve = yaml.safe_load((tiny_build.pytorch_dir / "llm_api_options.yaml").read_text())
    serve["kv_cache_config"]["free_gpu_memory_fraction"] = 0.8
    assert {k: options[k] for k in serve} == serve
    assert [f.line() for f in check_repository(out) if f.is_error] == []


def test_cli_writes_and_checks_with_exit_codes(tiny_build, tmp_path):
    out = tmp_path / "cli-repo"
    run = [sys.executable, "-m", "builder", "triton"]
    made = subprocess.run(
        [
            *run,
            str(tiny_build.build_dir),
            str(out),
            "--tokenizer",
            str(tiny_build.hf_dir),
            "--decoupled",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert made.returncode == 0, made.stderr  # generation runs the check: 0 = no findings
    assert "inflight_batcher_llm repository" in made.stdout
    config = out / MODELS_DIR / "tensorrt_llm" / "config.pbtxt"
    config.write_text(config.read_text().replace("decoupled: true", "decoupled: false"))
    findings = subprocess.run(
        [*run, "check", str(out)], capture_output=True, text=True, check=False
    )
    assert findings.returncode == 1 and findings.stderr.startswith("error: "), findings.stderr
    assert "decoupled is false but the repository was generated for streaming" in findings.stderr
    bad = subprocess.run(
        [*run, "check", str(tiny_build.hf_dir)], capture_output=True, text=True, check=False
    )
    assert (
        bad.returncode == 2 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr
    )


# Shims for the launchers this machine lacks: each starts its -np / --ntasks copies of the
# command one after the other, with the rank variables the real launcher sets. The generated
# scripts themselves run unmodified; the fake tritonserver records its arguments per rank.
MPIRUN = r"""#!/usr/bin/env bash
np=
while [ $# -gt 2 ]; do case "$1" in -np) np="$2"; shift 2 ;; *) shift ;; esac; done
for ((i = 0; i < np; i++)); do OMPI_COMM_WORLD_RANK=$i OMPI_COMM_WORLD_SIZE=$np "$@" || exit; done
"""
SRUN = r"""#!/usr/bin/env bash
n=
while [ $# -gt 2 ]; do case "$1" in --ntasks=*) n="${1#--ntasks=}" ;; esac; shift; done
for ((i = 0; i < n; i++)); do SLURM_PROCID=$i SLURM_NTASKS=$n "$@" || exit; done
"""
TRITONSERVER = r"""#!/usr/bin/env bash
printf '%s\n' "$@" > "$ARGS_DIR/rank${OMPI_COMM_WORLD_RANK:-$SLURM_PROCID}"
"""


@pytest.fixture
def launchers(tmp_path) -> dict[str, str]:
    bin_dir, args = tmp_path / "bin", tmp_path / "args"
    bin_dir.mkdir()
    args.mkdir()
    for name, text in (("mpirun", MPIRUN), ("srun", SRUN), ("tritonserver", TRITONSERVER)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "SLURM_", "PMIX_"))}
    env.pop("WORLD_SIZE", None)
    return {
        **env,
        "PATH": f"{bin_dir}{os.pathsep}{env['PATH']}",
        "TRITONSERVER": str(bin_dir / "tritonserver"),
        "ARGS_DIR": str(args),
    }


@pytest.mark.parametrize("script", ["serve.sh", "serve-mpirun.sh", "serve-slurm.sh"])
def test_launch_scripts_start_one_server_per_rank(tiny_build, tmp_path, launchers, script):
    """tp 2 x pp 2: four ranks; rank 0 serves every model on the ports, ranks 1-3 load only
    tensorrt_llm with no endpoints; a world size other than the engine's is refused."""
    record = read_build_record(write_engine_dir(tmp_path / "engine", tp=2, pp=2, max_batch_size=8))
    out = tmp_path / "repo"
    write_repository(record, TritonOptions(tokenizer_dir=tiny_build.hf_dir), out)
    launch = out / "launch" / script
    assert subprocess.run(["bash", "-n", str(launch)], check=False).returncode == 0
    run = subprocess.run(["bash", str(launch)], env=launchers, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    args = Path(launchers["ARGS_DIR"])
    ranks = {p.name: p.read_text().split() for p in sorted(args.iterdir())}
    assert sorted(ranks) == ["rank0", "rank1", "rank2", "rank3"]
    repository = f"--model-repository={(out / MODELS_DIR).resolve()}"
    assert repository in ranks["rank0"] and "--http-port=8000" in ranks["rank0"]
    assert "--load-model=tensorrt_llm" not in ranks["rank0"]
    for rank in ("rank1", "rank2", "rank3"):
        assert repository in ranks[rank]
        assert {"--model-control-mode=explicit", "--load-model=tensorrt_llm"} <= set(ranks[rank])
        assert {"--allow-http=false", "--allow-grpc=false"} <= set(ranks[rank])
        assert not any(a.startswith("--http-port") for a in ranks[rank])
    for path in args.iterdir():
        path.unlink()
    # WORLD_SIZE is often exported by other tools: it sizes the launch but cannot change
    # what the engine needs.
    wrong = subprocess.run(
        ["bash", str(launch)], env={**launchers, "WORLD_SIZE": "8"}, capture_output=True, text=True
    )
    assert wrong.returncode == 2
    assert "MPI world size 8 != tp x pp = 4 of the engine" in wrong.stderr, wrong.stderr
    assert list(args.iterdir()) == []  # no tritonserver was started

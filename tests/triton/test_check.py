"""`builder triton check`: passes on generated repositories, and names each common mistake
(triton.md section 5) precisely when one is seeded into a copy."""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from builder.triton import TritonOptions, read_build_record, write_repository
from builder.triton.check import check_repository
from builder.triton.repository import MODELS_DIR


@pytest.fixture(scope="module")
def generated(tiny_build, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("check")
    engine, llmapi = root / "engine", root / "llmapi"
    options = TritonOptions(
        tokenizer_dir=tiny_build.hf_dir, decoupled=True, tokenizer_instances=1, bls_instances=1
    )
    write_repository(read_build_record(tiny_build.build_dir), options, engine)
    write_repository(read_build_record(tiny_build.pytorch_dir), options, llmapi)
    return {"engine": engine, "llmapi": llmapi}


def edit(path: Path, old: str, new: str, count: int = 1) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, count))


def model(root: Path, name: str) -> Path:
    return root / MODELS_DIR / name / "config.pbtxt"


def set_parameter(root: Path, name: str, key: str, value: str) -> None:
    edit(
        model(root, name),
        f'  key: "{key}"\n  value {{ string_value: ',
        f'  key: "{key}"\n  value {{ string_value: "{value}" }}\n}}\nparameters {{\n  key: '
        f'"unused_{key}"\n'
        "  value { string_value: ",
    )


def add_parameter(root: Path, name: str, key: str, value: str) -> None:
    path = model(root, name)
    path.write_text(
        path.read_text()
        + f'parameters {{\n  key: "{key}"\n  value {{ string_value: "{value}" }}\n}}\n'
    )


def errors(root: Path) -> list[str]:
    return [f.line() for f in check_repository(root) if f.is_error]


@pytest.mark.parametrize("layout", ["engine", "llmapi"])
def test_check_passes_on_generated_repositories(generated, layout):
    assert errors(generated[layout]) == []


def _tokenizer_inside(root: Path) -> None:
    inside = root / MODELS_DIR / "tokenizer"
    shutil.copytree(Path(_tokenizer_inside.hf_dir), inside)
    for name in ("preprocessing", "postprocessing"):
        set_parameter(root, name, "tokenizer_dir", str(inside))


def _engine_dir_without_config(root: Path) -> None:
    empty = root.parent / f"{root.name}-not-an-engine"
    empty.mkdir()
    set_parameter(root, "tensorrt_llm", "gpt_model_path", str(empty))


def _tokenizer_unloadable(root: Path) -> None:
    broken = root.parent / f"{root.name}-broken-tokenizer"
    shutil.copytree(Path(_tokenizer_inside.hf_dir), broken)
    (broken / "tokenizer.json").write_text('{"version": "1.0", "model": ')  # truncated
    set_parameter(root, "preprocessing", "tokenizer_dir", str(broken))


def _batch_above_engine(root: Path) -> None:
    for name in ("preprocessing", "tensorrt_llm", "postprocessing", "ensemble", "tensorrt_llm_bls"):
        edit(model(root, name), "max_batch_size: 4", "max_batch_size: 8")


# (id, seed the mistake into a copy of the engine repository, the expected error (regex))
MISTAKES: list[tuple[str, Callable[[Path], None], str]] = [
    (
        "typed-placeholder-unfilled",
        lambda r: edit(
            model(r, "tensorrt_llm"),
            'name: "encoder_input_features"\n    data_type: TYPE_FP16',
            'name: "encoder_input_features"\n    data_type: ${encoder_input_features_data_type}',
        ),
        (
            r"tensorrt_llm/config.pbtxt: line \d+: unfilled placeholder "
            r"\$\{encoder_input_features_data_type\} in a typed "
            r"field; Triton refuses the file"
        ),
    ),
    (
        "string-placeholder-unfilled",
        lambda r: set_parameter(
            r, "tensorrt_llm", "batch_scheduler_policy", "${batch_scheduler_policy}"
        ),
        r"tensorrt_llm/config.pbtxt: parameters batch_scheduler_policy: unfilled placeholder "
        r"\$\{batch_scheduler_policy\}",
    ),
    (
        "misspelled-field",
        lambda r: edit(model(r, "preprocessing"), "max_batch_size: 4", "max_batch_sise: 4"),
        r"preprocessing/config.pbtxt: not a valid ModelConfig: .*has no field named "
        r'"max_batch_sise"',
    ),
    (
        "unknown-dtype",
        lambda r: edit(model(r, "postprocessing"), "TYPE_STRING", "TYPE_FP99"),
        r"postprocessing/config.pbtxt: not a valid ModelConfig: .*TYPE_FP99",
    ),
    (
        "quoted-integer",
        lambda r: edit(model(r, "ensemble"), "max_batch_size: 4", 'max_batch_size: "4"'),
        r"ensemble/config.pbtxt: not a valid ModelConfig: .*max_batch_size.*integer",
    ),
    (
        "batching-strategy-unknown",
        lambda r: set_parameter(r, "tensorrt_llm", "gpt_model_type", "inflight_batcher"),
        r"tensorrt_llm/config.pbtxt: parameters gpt_model_type 'inflight_batcher' "
        r"\(batching_strategy\): expected one of inflight_fused_batching, inflight_batching, V1",
    ),
    (
        "rank-script-world-size-not-tp-x-pp",
        lambda r: edit(
            r / "launch" / "triton-rank.sh", "ENGINE_WORLD_SIZE=1 ", "ENGINE_WORLD_SIZE=8 "
        ),
        r"launch/triton-rank.sh: ENGINE_WORLD_SIZE 8 != tp x pp = 1 x 1 = 1 of the engine "
        r".*'mpiSize == tp \* pp'",
    ),
    (
        "world-size-not-tp-x-pp",
        lambda r: edit(
            r / "launch" / "serve.sh",
            'WORLD_SIZE="${WORLD_SIZE:-1}"',
            'WORLD_SIZE="${WORLD_SIZE:-8}"',
        ),
        r"launch/serve.sh: WORLD_SIZE 8 != tp x pp = 1 x 1 = 1 of the engine .*'mpiSize == tp \* "
        r"pp'",
    ),
    (
        "streaming-without-decoupled",
        lambda r: edit(model(r, "tensorrt_llm"), "decoupled: true", "decoupled: false"),
        (
            r"tensorrt_llm/config.pbtxt: model_transaction_policy.decoupled is false but the "
            r"repository was generated for "
            r"streaming \(--decoupled\): stream requests fail with 'Streaming is only supported "
            r"if model is deployed using "
            r"decoupled mode'"
        ),
    ),
    (
        "bls-decoupled-differs",
        lambda r: edit(model(r, "tensorrt_llm_bls"), "decoupled: true", "decoupled: false"),
        r"tensorrt_llm_bls/config.pbtxt: model_transaction_policy.decoupled false differs from "
        r"tensorrt_llm's true",
    ),
    (
        "tokenizer-hub-id",
        lambda r: set_parameter(
            r, "preprocessing", "tokenizer_dir", "nvidia/Llama-3_1-Nemotron-Ultra-253B-v1"
        ),
        r"preprocessing/config.pbtxt: tokenizer_dir nvidia/Llama-3_1-Nemotron-Ultra-253B-v1: not "
        r"an absolute path",
    ),
    (
        "tokenizer-missing",
        lambda r: set_parameter(r, "postprocessing", "tokenizer_dir", "/nonexistent/tokenizer"),
        (
            r"postprocessing/config.pbtxt: tokenizer_dir /nonexistent/tokenizer: no such "
            r"directory \(transformers would take "
            r"it for a Hub id and try to download it\)"
        ),
    ),
    (
        "tokenizer-unloadable",
        _tokenizer_unloadable,
        r"preprocessing/config.pbtxt: tokenizer_dir .*-broken-tokenizer: does not load with "
        r"AutoTokenizer \(local files only, no remote code\): ",
    ),
    (
        "tokenizer-inside-repository",
        _tokenizer_inside,
        (
            r"model_repository/tokenizer: a directory without config.pbtxt inside the model "
            r"repository: Triton reads every "
            r"directory as a model and fails with 'failed to open .*/tokenizer/config.pbtxt'"
        ),
    ),
    (
        "batch-above-engine",
        _batch_above_engine,
        r"tensorrt_llm/config.pbtxt: max_batch_size 8 is above the engine's built max_batch_size 4",
    ),
    (
        "kv-token-cap-below-one-sequence",
        lambda r: add_parameter(r, "tensorrt_llm", "max_tokens_in_paged_kv_cache", "128"),
        (
            r"parameters max_tokens_in_paged_kv_cache 128: below the engine's max_seq_len 8192; "
            r"the backend fails with "
            r"'maxTokensInPagedKvCache must be large enough to process at least 1 sequence'"
        ),
    ),
    (
        "kv-fraction-too-small",
        lambda r: set_parameter(r, "tensorrt_llm", "kv_cache_free_gpu_mem_fraction", "1e-06"),
        (
            r"parameters kv_cache_free_gpu_mem_fraction 1e-06: the plan gives [\d,]+ KV tokens "
            r"per rank, less than one "
            r"max_seq_len 8,192 sequence"
        ),
    ),
    (
        "engine-dir-without-config-json",
        _engine_dir_without_config,
        (
            r"parameters gpt_model_path .*-not-an-engine: no engine config.json there; the "
            r"backend fails with "
            r"'\[json.exception.parse_error.101\]"
        ),
    ),
    (
        "ensemble-batch-above-member",
        lambda r: edit(model(r, "preprocessing"), "max_batch_size: 4", "max_batch_size: 2"),
        (
            r"ensemble/config.pbtxt: max_batch_size 4 is above preprocessing's 2 .*'ensemble "
            r"allows maximum batch size 4, but "
            r"preprocessing only allows 2'"
        ),
    ),
    (
        "ensemble-dtype-mismatch",
        lambda r: edit(
            model(r, "preprocessing"),
            'name: "INPUT_ID"\n    data_type: TYPE_INT32',
            'name: "INPUT_ID"\n    data_type: TYPE_INT64',
        ),
        (
            r"ensemble/config.pbtxt \(step tensorrt_llm\): '_INPUT_ID' -> tensorrt_llm.input_ids: "
            r"data_type TYPE_INT64 "
            r"\(preprocessing.INPUT_ID\) != TYPE_INT32"
        ),
    ),
    (
        "ensemble-dims-mismatch",
        lambda r: edit(
            model(r, "preprocessing"),
            'name: "REQUEST_INPUT_LEN"\n    data_type: TYPE_INT32\n    dims: [ 1 ]',
            'name: "REQUEST_INPUT_LEN"\n    data_type: TYPE_INT32\n    dims: [ 1, 1 ]',
        ),
        r"ensemble/config.pbtxt \(step tensorrt_llm\): '_REQUEST_INPUT_LEN' -> "
        r"tensorrt_llm.input_lengths: dims \[1, 1\] \(preprocessing.REQUEST_INPUT_LEN\) do not "
        r"match \[1\]",
    ),
    (
        "ensemble-step-unknown-model",
        lambda r: edit(
            model(r, "ensemble"), 'model_name: "postprocessing"', 'model_name: "postproc"'
        ),
        r"ensemble/config.pbtxt: step postproc: no such model in the repository",
    ),
    (
        "ensemble-unknown-tensor",
        lambda r: edit(model(r, "ensemble"), 'value: "_TOKENS_BATCH"', 'value: "_TOKEN_BATCH"'),
        r"input_map 'TOKENS_BATCH' <- '_TOKENS_BATCH': no ensemble input or earlier step output "
        r"named '_TOKENS_BATCH'",
    ),
]


@pytest.mark.parametrize(
    ("seed", "expected"), [(m[1], m[2]) for m in MISTAKES], ids=[m[0] for m in MISTAKES]
)
def test_check_names_each_seeded_mistake(generated, tiny_build, tmp_path, seed, expected, capsys):
    copy = tmp_path / "repo"
    shutil.copytree(generated["engine"], copy)
    _tokenizer_inside.hf_dir = tiny_build.hf_dir
    seed(copy)
    found = errors(copy)
    with capsys.disabled():
        print("\n  " + "\n  ".join(found))
    assert any(re.search(expected, line) for line in found), found
    if "ModelConfig" in expected or "typed" in expected:
        assert len(found) == 1, (
            found
        )  # a file that does not parse is reported once, without follow-ups


def test_check_llmapi_batching_belongs_in_model_yaml(generated, tmp_path):
    copy = tmp_path / "llmapi"
    shutil.copytree(generated["llmapi"], copy)
    edit(model(copy, "tensorrt_llm"), 'backend: "python"', 'backend: "python"\nmax_batch_size: 64')
    edit(
        copy / MODELS_DIR / "tensorrt_llm" / "1" / "model.yaml",
        "decoupled: true",
        "decoupled: false",
    )
    found = errors(copy)
    assert any(
        "max_batch_size / model_transaction_policy set in config.pbtxt: they belong in "
        "1/model.yaml "
        "triton_config" in line
        for line in found
    ), found
    assert any(
        "triton_config.decoupled is false but the repository was generated for streaming" in line
        for line in found
    ), found

"""Generated trtllm-build arguments against the pinned release's flag set."""

from __future__ import annotations

import re

import pytest

from builder.deploy import (
    arg_problems,
    load_flag_set,
    load_profile,
    shipped_profiles,
    trtllm_build_args,
)
from builder.errors import UserError


def test_flag_set_names_its_source():
    flag_set = load_flag_set()
    assert flag_set.release.startswith("1.2")
    paths = {s.get("path") for s in flag_set.sources}
    assert {"tensorrt_llm/commands/build.py", "tensorrt_llm/plugin/plugin.py"} <= paths
    for source in flag_set.sources:
        if "commit" in source:
            assert re.fullmatch(r"[0-9a-f]{40}", source["commit"])
            assert source["repository"] == "https://github.com/NVIDIA/TensorRT-LLM"
    # flags the profiles rely on, with the values their enum/Literal types allow
    assert "fp8" in flag_set.flags["--gemm_plugin"]["choices"]
    assert flag_set.flags["--reduce_fusion"]["choices"] == ["enable", "disable"]
    assert flag_set.spec("--max_decoder_seq_len") is flag_set.flags["--max_seq_len"]


@pytest.mark.parametrize("name", sorted(shipped_profiles()))
def test_every_profile_generates_valid_arguments(name):
    profile = load_profile(name)
    args = trtllm_build_args(profile, "/ckpt", "/engine")
    assert arg_problems(args) == []
    values = dict(zip(args[::2], args[1::2], strict=True))
    # limits are always explicit: the defaults make Ultra OOM (TensorRT-LLM PR 8399)
    for flag, field in [
        ("--max_seq_len", "max_seq_len"),
        ("--max_num_tokens", "max_num_tokens"),
        ("--max_batch_size", "max_batch_size"),
        ("--workers", "workers"),
    ]:
        assert values[flag] == str(getattr(profile.build, field))
    assert values["--gemm_plugin"] == ("fp8" if profile.fp8_weights else "auto")
    assert values["--use_fp8_context_fmha"] == ("enable" if profile.fp8_weights else "disable")
    assert values["--kv_cache_type"] == "paged"


def test_reduce_fusion_is_off_without_tensor_parallelism():
    args = trtllm_build_args(load_profile("h100x8-bf16", [("parallel.tp", 1)]), "/c", "/e")
    assert args[args.index("--reduce_fusion") + 1] == "disable"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max_batch_sise", "8"], "--max_batch_sise: unknown flag"),
        (["--gemm_plugin", "fp16"], "--gemm_plugin 'fp16': not one of"),
        (["--max_seq_len", "8k"], "expected an integer"),
        (["--max_seq_len"], "--max_seq_len: needs a value"),
        (["--workers", "2", "--workers", "4"], "--workers: given twice"),
        (["--paged_kv_cache", "enable"], "deprecated"),
        (
            ["--multiple_profiles", "enable", "--opt_num_tokens", "256"],
            "conflicts with --opt_num_tokens",
        ),
        (["8", "--workers", "2"], "8: stray value"),
    ],
)
def test_arg_problems_catch_each_mistake(args, message):
    assert any(message in p for p in arg_problems(args)), arg_problems(args)


def test_switches_and_lists_parse():
    assert (
        arg_problems(
            ["--strip_plan", "--lora_target_modules", "attn_q", "attn_k", "--workers", "1"]
        )
        == []
    )


def test_profile_with_a_value_the_release_lacks_is_refused(tmp_path):
    profile = load_profile("h100x4-fp8", [("build.gemm_plugin", "fp16")])
    with pytest.raises(
        UserError, match=r"pinned trtllm-build 1\.2\.1 flag set: --gemm_plugin 'fp16'"
    ):
        trtllm_build_args(profile, "/c", "/e")

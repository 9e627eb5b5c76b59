"""Target profiles: shipped files, comments on every value, user files, overrides, errors."""

from __future__ import annotations

import re

import pytest

from builder.deploy.profiles import (
    MISSION_TARGETS,
    ProfileError,
    load_profile,
    parse_override,
    profile_dirs,
    shipped_profiles,
    with_overrides,
)

SHIPPED = {"h100x8-bf16", "h100x4-fp8", "b100x4-fp8", "h200x8-bf16", "h200x4-fp8"}
KEY_LINE = re.compile(r"^\s*[A-Za-z_][A-Za-z0-9_]*\s*=")


def test_shipped_profiles_are_found_and_load():
    assert set(shipped_profiles()) == SHIPPED
    assert set(MISSION_TARGETS) <= SHIPPED
    for name in SHIPPED:
        profile = load_profile(name)
        assert profile.name == name
        assert profile.world_size <= profile.total_gpus
        assert profile.precision.weights in name and profile.precision.kv_cache in name


def test_shipped_profile_parallelism_matches_the_issue():
    assert {n: load_profile(n).parallel.tp for n in SHIPPED} == {
        "h100x8-bf16": 8,
        "h100x4-fp8": 4,
        "b100x4-fp8": 4,
        "h200x8-bf16": 8,
        "h200x4-fp8": 4,
    }


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_every_value_has_a_comment_saying_why(name):
    """Each `key = value` line sits in a block (since the last blank line or [section]) that a
    comment opened, or carries an inline comment."""
    commented = False
    for number, line in enumerate(shipped_profiles()[name].read_text().splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("["):
            commented = False
        elif stripped.startswith("#"):
            commented = True
        elif KEY_LINE.match(line):
            assert commented or "#" in line, f"{name}.toml:{number} has no comment: {line}"


def test_profiles_come_from_the_package_data():
    dirs = profile_dirs()
    assert dirs and dirs[0].name == "engines" and dirs[0].parent.name == "_data"
    assert (dirs[0] / "h100x8-bf16.toml").is_file()


def test_user_profile_with_base_and_its_own_values(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text(
        'base = "h100x8-bf16"\n[build]\nmax_batch_size = 16\n[runtime]\nisl = 5000\nosl = 500\n'
    )
    profile = load_profile(str(path))
    assert profile.name == "mine" and profile.source == str(path)
    assert profile.build.max_batch_size == 16 and profile.runtime.isl == 5000
    assert profile.hardware == load_profile("h100x8-bf16").hardware


def test_unknown_field_names_the_field_and_the_file(tmp_path):
    path = tmp_path / "typo.toml"
    path.write_text('base = "h100x4-fp8"\n[build]\nmax_batch_sise = 16\n')
    with pytest.raises(ProfileError, match=r"typo\.toml.*unknown field 'build\.max_batch_sise'"):
        load_profile(str(path))
    path.write_text('base = "h100x4-fp8"\n[gpu]\nx = 1\n')
    with pytest.raises(ProfileError, match=r"typo\.toml.*unknown field 'gpu'"):
        load_profile(str(path))


def test_missing_field_and_wrong_type_are_named(tmp_path):
    path = tmp_path / "partial.toml"
    path.write_text("[parallel]\ntp = 8\npp = 1\n")
    with pytest.raises(ProfileError, match=r"partial\.toml: required field 'target\.summary'"):
        load_profile(str(path))
    path.write_text('base = "h100x8-bf16"\n[build]\nmax_seq_len = "8k"\n')
    with pytest.raises(ProfileError, match=r"build\.max_seq_len = '8k': expected int"):
        load_profile(str(path))
    path.write_text('base = "h100x8-bf16"\n[precision]\nweights = "int4"\n')
    with pytest.raises(
        ProfileError, match=r"precision\.weights = 'int4': must be one of bf16, fp8"
    ):
        load_profile(str(path))


def test_overrides_use_toml_literals():
    assert parse_override("build.max_batch_size=32") == ("build.max_batch_size", 32)
    assert parse_override("runtime.kv_cache_free_gpu_mem_fraction = 0.85") == (
        "runtime.kv_cache_free_gpu_mem_fraction",
        0.85,
    )
    assert parse_override("build.reduce_fusion=false") == ("build.reduce_fusion", False)
    assert parse_override("build.gemm_plugin=disable") == ("build.gemm_plugin", "disable")
    with pytest.raises(ProfileError, match="SECTION.FIELD=VALUE"):
        parse_override("max_batch_size=32")


def test_overrides_are_checked_like_file_values():
    profile = load_profile("h100x8-bf16", [("build.max_batch_size", 32), ("parallel.tp", 4)])
    assert profile.build.max_batch_size == 32 and profile.parallel.tp == 4
    assert profile.overrides == (("build.max_batch_size", 32), ("parallel.tp", 4))
    with pytest.raises(ProfileError, match=r"--set build\.bogus: unknown field"):
        load_profile("h100x8-bf16", [("build.bogus", 1)])
    with pytest.raises(ProfileError, match=r"build\.max_batch_size = 0: must be positive"):
        load_profile("h100x8-bf16", [("build.max_batch_size", 0)])
    with pytest.raises(ProfileError, match=r"kv_cache_free_gpu_mem_fraction = 1\.5: must be in"):
        load_profile("h100x8-bf16", [("runtime.kv_cache_free_gpu_mem_fraction", 1.5)])
    assert with_overrides(profile, [("runtime.isl", 5000)]).runtime.isl == 5000


def test_inconsistent_profiles_are_refused():
    with pytest.raises(ProfileError, match="max_input_len 9000 exceeds build.max_seq_len 8192"):
        load_profile("h100x8-bf16", [("build.max_input_len", 9000)])
    with pytest.raises(ProfileError, match="16 ranks but the hardware has 8 GPUs"):
        load_profile("h100x8-bf16", [("parallel.pp", 2), ("parallel.tp", 8)])
    with pytest.raises(ProfileError, match="use_fp8_context_fmha needs precision.kv_cache"):
        load_profile("h100x4-fp8", [("precision.kv_cache", "bf16")])


def test_unknown_target_lists_the_shipped_ones():
    with pytest.raises(ProfileError, match=r"unknown target 'a100x8'.*h100x8-bf16"):
        load_profile("a100x8")
    with pytest.raises(ProfileError, match="not found"):
        load_profile("no/such/file.toml")

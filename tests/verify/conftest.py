"""Goldens and FP8 exports shared by the verify tests (written once per session)."""

from __future__ import annotations

import pytest

# Small sizes: each golden prompt costs one streamed pass, each greedy token one more.
SMOL_GOLDEN = {
    "windows": 2,
    "seq_len": 64,
    "chat_prompts": 1,
    "continuation": 8,
    "dtype": "float32",
}


@pytest.fixture(autouse=True, scope="module")
def _small_matrices(one_torch_thread):
    pass


@pytest.fixture(scope="session")
def smollm2_golden(tmp_path_factory, smollm2_ckpt):
    from builder.verify.golden import GoldenSettings, build_golden

    return build_golden(
        smollm2_ckpt, tmp_path_factory.mktemp("golden") / "smollm2", GoldenSettings(**SMOL_GOLDEN)
    )

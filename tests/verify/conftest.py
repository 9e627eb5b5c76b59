"""Goldens and FP8 exports shared by the verify tests (written once per session)."""

from __future__ import annotations

import pytest

# Small sizes: each golden prompt costs one streamed pass, each greedy token one more.
SMOL_GOLDEN = {"windows": 2, "seq_len": 64, "chat_prompts": 1, "continuation": 8, "dtype": "float32"}


@pytest.fixture(autouse=True, scope="module")
def _small_matrices(one_torch_thread):
    pass


@pytest.fixture(scope="session")
def smollm2_fp8(tmp_path_factory, smollm2_ckpt):
    """FP8 SmolLM2 (both exports), calibrated as calib/thresholds.toml [smollm2-ci] says."""
    from builder.quantize.accuracy import threshold_setup
    from builder.quantize.pipeline import quantize_checkpoint

    setup = threshold_setup("smollm2-ci")
    out = tmp_path_factory.mktemp("fp8") / "smollm2-fp8"
    quantize_checkpoint(smollm2_ckpt, out, calib_size=setup["calib_size"], calib_seq_len=setup["calib_seq_len"],
                        dtype=setup["dtype"])
    return out


@pytest.fixture(scope="session")
def smollm2_golden(tmp_path_factory, smollm2_ckpt):
    from builder.verify.golden import GoldenSettings, build_golden

    return build_golden(smollm2_ckpt, tmp_path_factory.mktemp("golden") / "smollm2", GoldenSettings(**SMOL_GOLDEN))

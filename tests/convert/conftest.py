"""Helpers for convert tests: private copies of the session checkpoints to break."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(autouse=True, scope="module")
def _small_matrices(one_torch_thread):
    """Every test here works on small tensors (see one_torch_thread)."""


@pytest.fixture
def mixed_copy(tmp_path, mixed_ckpt) -> Path:
    """A writable copy of the mixed checkpoint (bf16, one shard)."""
    return Path(shutil.copytree(mixed_ckpt, tmp_path / "src"))

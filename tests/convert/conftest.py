"""Helpers for convert tests: private copies of the session checkpoints to break."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Small tensors: a second OpenMP thread only adds barrier waits on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def mixed_copy(tmp_path, mixed_ckpt) -> Path:
    """A writable copy of the mixed checkpoint (bf16, one shard)."""
    return Path(shutil.copytree(mixed_ckpt, tmp_path / "src"))

"""One torch thread for these small-matrix tests: with two threads, a busy 2-core machine
spends most of each tiny matmul in OpenMP barriers (measured 10x slower)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

"""Every executor test here multiplies small matrices (see one_torch_thread)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="module")
def _small_matrices(one_torch_thread):
    pass

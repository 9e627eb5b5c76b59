"""The `records` fixture: the factories of hand-made run records."""

from __future__ import annotations

import pytest

from tests.report.factories import bench_record, verify_record


@pytest.fixture
def records():
    return bench_record, verify_record

"""builder.units: the one parser and formatter of sizes, durations and index ranges; and
builder.dtypes, the one dtype table."""

from __future__ import annotations

import pytest
import torch

from builder import dtypes
from builder.errors import UserError
from builder.units import (
    GIB,
    MIB,
    clock_text,
    duration,
    format_ranges,
    gib,
    parse_ranges,
    parse_size,
)


@pytest.mark.parametrize(
    ("text", "values"),
    [("0-3", [0, 1, 2, 3]), ("5", [5]), ("0-1,6-7", [0, 1, 6, 7]), (" 2 - 3 , 2 ", [2, 3])],
)
def test_ranges_parse_and_format_back(text, values):
    assert parse_ranges(text, 8, "--ranks") == values
    assert parse_ranges(format_ranges(values), 8, "--ranks") == values


def test_format_ranges_compresses_runs():
    assert format_ranges([7, 0, 1, 2, 5, 8]) == "0-2,5,7-8"
    assert format_ranges([]) == ""


@pytest.mark.parametrize("text", ["5-2", "0-8", "a", "", "1,,2"])
def test_bad_ranges_name_the_option(text):
    with pytest.raises(UserError, match="^--layers: "):
        parse_ranges(text, 8, "--layers")


def test_sizes_and_durations():
    assert parse_size("4GB") == 4 * 10**9 and parse_size("512MiB") == 512 * MIB
    assert gib(3 * GIB) == "3.00 GiB"
    assert [duration(s) for s in (45, 720, 12600)] == ["45 s", "12 min", "3.5 h"]
    assert clock_text(245) == "4:05" and clock_text(3723) == "1:02:03"
    with pytest.raises(UserError, match="cannot read size"):
        parse_size("lots")


def test_the_dtype_table_matches_torch():
    for entry in dtypes.TABLE:
        dtype = dtypes.torch_dtype(entry.name)
        assert dtype.itemsize == entry.itemsize and dtype.is_floating_point == entry.floating
    assert dtypes.FP8_MAX == torch.finfo(torch.float8_e4m3fn).max
    assert set(dtypes.torch_dtypes()) == set(dtypes.COMPUTE)

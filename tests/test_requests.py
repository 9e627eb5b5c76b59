"""Typed requests and registries: frozen request dataclasses at the convert/quantize/build entry
points, rank states as an enum, the CLI's choices taken from the registries."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from builder.cli import main
from builder.convert.pipeline import ConvertRequest, RankState, convert, convert_checkpoint
from builder.deploy.backends import BACKENDS
from builder.dtypes import COMPUTE
from builder.errors import UserError
from builder.quantize.exporters import EXPORTERS
from builder.quantize.pipeline import QuantizeRequest
from builder.registry import Registry
from builder.verify.runtimes import RUNTIMES


def test_convert_request_is_frozen_and_normalised(tmp_path):
    request = ConvertRequest(str(tmp_path / "src"), str(tmp_path / "out"), 2, ranks=[3, 1])
    assert request.src == tmp_path / "src" and isinstance(request.out, Path)
    assert request.ranks == (3, 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.tp = 4  # type: ignore[misc]
    with pytest.raises(UserError, match="--workers"):
        ConvertRequest(tmp_path, tmp_path / "out", 1, workers=0)


def test_convert_checkpoint_refuses_an_unknown_option(tmp_path):
    with pytest.raises(TypeError, match="nonsense"):
        convert_checkpoint(tmp_path, tmp_path / "out", 1, nonsense=True)


def test_convert_reports_rank_states_as_enum_and_plain_json(mixed_ckpt, tmp_path):
    summary = convert(ConvertRequest(mixed_ckpt, tmp_path / "out", 2))
    assert [r.status for r in summary.ranks] == [RankState.WRITTEN] * 2
    assert all(r.status is RankState.WRITTEN for r in summary.ranks)
    data = json.loads(json.dumps(summary.to_json()))
    assert [r["status"] for r in data["ranks"]] == ["written", "written"]


def test_quantize_request_checks_formats_and_dtype(tmp_path):
    both = QuantizeRequest(tmp_path, tmp_path / "out", formats="both")
    assert both.formats == EXPORTERS.names() == ("trtllm", "hf")
    assert QuantizeRequest(tmp_path, tmp_path / "out", formats="hf").formats == ("hf",)
    with pytest.raises(UserError, match="export format"):
        QuantizeRequest(tmp_path, tmp_path / "out", formats="gguf")
    with pytest.raises(UserError, match="--dtype"):
        QuantizeRequest(tmp_path, tmp_path / "out", dtype="int4")


def test_registry_names_duplicates_and_unknown_keys():
    registry: Registry[int] = Registry("widget")
    registry.register("a")(1)
    with pytest.raises(ValueError, match="twice"):
        registry.register("a")(2)
    with pytest.raises(UserError, match="unknown widget 'b'; choose one of a"):
        registry.get("b")
    assert registry.names() == ("a",) and "a" in registry


@pytest.mark.parametrize(
    ("command", "option", "choices"),
    [
        ("quantize", "--format", [*EXPORTERS.names(), "both"]),
        ("build", "--backend", list(BACKENDS.names())),
        ("verify", "--runtime", list(RUNTIMES)),
        ("convert", "--dtype", ["auto", *COMPUTE]),
    ],
)
def test_cli_choices_come_from_the_registries(command, option, choices):
    cmd = main.get_command(None, command)
    (param,) = [p for p in cmd.params if option in p.opts]
    assert list(param.type.choices) == choices
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0 and "|".join(choices) in result.output

"""`builder info` and the CLI's user-error policy: exit 2, one line, no traceback."""

from __future__ import annotations

import copy
import json

import pytest
from click.testing import CliRunner

from builder.arch import preset_config
from builder.cli import main


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def test_help_explains_the_pipeline():
    result = run("--help")
    assert result.exit_code == 0
    for command in ("info", "convert", "quantize", "plan", "build", "synth", "demo"):
        assert command in result.output


def test_info_preset_json():
    result = run("info", "--preset", "ultra-253b", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["totals"]["params"] == 253_401_268_224
    assert data["totals"]["counts"]["empty"] == 81
    assert len(data["layers"]) == 162
    assert (
        data["layers"][134]["ffn_width"] == 425984 and data["layers"][134]["attention"] == "no_op"
    )


def test_info_tp_pp_per_rank_shapes():
    result = run("info", "--preset", "ultra-253b", "--tp", "8", "--json", "--no-layers")
    data = json.loads(result.output)
    ranks = data["parallel"]["ranks"]
    assert len(ranks) == 8 and ranks[0]["tensors"] == 519
    assert ranks[0]["shapes"]["transformer.layers.0.attention.qkv.weight"] == [2304, 16384]
    assert data["parallel"]["kv_cache_bytes_per_token_per_rank_bf16"] == 32768


def test_info_table_on_checkpoint(mixed_ckpt):
    result = run("info", str(mixed_ckpt))
    assert result.exit_code == 0, result.output
    assert "Per-layer plan" in result.output and "1, 2, 4, 8" in result.output


def _write_config(tmp_path, config) -> str:
    (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path)


def _mutated(mutate) -> dict:
    config = copy.deepcopy(preset_config("mixed"))
    mutate(config)
    return config


BAD_CONFIGS = {
    "model_type": (lambda c: c.update(model_type="llama"), "model_type 'llama'"),
    "block_configs": (lambda c: c.pop("block_configs"), "'block_configs' is missing"),
    "count": (lambda c: c.update(num_hidden_layers=11), "12 entries but num_hidden_layers is 11"),
    "group": (
        lambda c: c["block_configs"][1]["attention"].update(n_heads_in_group=5),
        "block_configs[1].attention.n_heads_in_group = 5",
    ),
    "sparsify": (
        lambda c: c["block_configs"][0]["ffn"].update(sparsify={"x": 1}),
        "block_configs[0].ffn.sparsify",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_configs_exit_2_with_named_field(tmp_path, case):
    mutate, fragment = BAD_CONFIGS[case]
    result = run("info", _write_config(tmp_path, _mutated(mutate)))
    assert result.exit_code == 2
    assert fragment in result.output
    assert "config.json" in result.output
    assert "Traceback" not in result.output


def test_unreadable_config(tmp_path):
    (tmp_path / "config.json").write_bytes(b"\xff\xfe not json")
    result = run("info", str(tmp_path))
    assert (
        result.exit_code == 2
        and "config.json" in result.output
        and "Traceback" not in result.output
    )


def test_missing_config(tmp_path):
    result = run("info", str(tmp_path))
    assert result.exit_code == 2 and "no config.json" in result.output


def test_checkpoint_and_preset_are_exclusive(mixed_ckpt):
    result = run("info", str(mixed_ckpt), "--preset", "mixed")
    assert result.exit_code == 2 and "either" in result.output


def test_impossible_tp_is_a_user_error():
    result = run("info", "--preset", "mixed", "--tp", "3")
    assert result.exit_code == 2 and "not divisible by tp 3" in result.output


def test_synth_cli(tmp_path):
    result = run("synth", str(tmp_path / "s"), "--preset", "mixed", "--hidden", "64")
    assert result.exit_code == 0, result.output
    assert "12 layers, hidden 64" in result.output
    result = run("synth", str(tmp_path / "t"), "--target-size", "lots")
    assert result.exit_code == 2 and "cannot read size" in result.output

"""Auto-class registration, remote code never run, and configs refused with the field named."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import builder.model  # noqa: F401  (registers the Auto classes)
from builder.errors import ConfigError
from builder.io.checkpoint import CheckpointError
from builder.model import DeciConfig, DeciLMConfig, DeciLMForCausalLM, load_reference_model

REMOTE_CODE = """\
import pathlib
pathlib.Path(__file__).with_name("REMOTE_CODE_RAN").write_text("{module}")
raise RuntimeError("remote code must never be imported")
"""


def copy_ckpt(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def edit_config(directory: Path, **changes) -> dict:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if callable(value):
            value(config)
        else:
            config[key] = value
    path.write_text(json.dumps(config))
    return config


@pytest.fixture
def with_auto_map(mixed_ckpt, tmp_path):
    """The mixed checkpoint with the published auto_map and booby-trapped remote code files."""
    ckpt = copy_ckpt(mixed_ckpt, tmp_path / "remote")
    edit_config(
        ckpt,
        auto_map={
            "AutoConfig": "configuration_decilm.DeciLMConfig",
            "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM",
        },
    )
    for module in ("configuration_decilm", "modeling_decilm"):
        (ckpt / f"{module}.py").write_text(REMOTE_CODE.format(module=module))
    return ckpt


def test_auto_classes_load_without_running_remote_code(with_auto_map):
    config = AutoConfig.from_pretrained(with_auto_map)
    assert type(config) is DeciLMConfig
    assert not hasattr(config, "auto_map")
    model = AutoModelForCausalLM.from_pretrained(with_auto_map)
    assert type(model) is DeciLMForCausalLM
    assert not (with_auto_map / "REMOTE_CODE_RAN").exists()
    assert not any(
        name.endswith(("configuration_decilm", "modeling_decilm")) for name in sys.modules
    )
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_deci_model_type_loads_the_same_model(mixed_ckpt_fp32, tmp_path):
    ckpt = copy_ckpt(mixed_ckpt_fp32, tmp_path / "deci")
    edit_config(ckpt, model_type="deci")
    config = AutoConfig.from_pretrained(ckpt)
    assert isinstance(config, DeciConfig) and config.model_type == "deci"
    deci = AutoModelForCausalLM.from_pretrained(ckpt)
    nas = AutoModelForCausalLM.from_pretrained(mixed_ckpt_fp32)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(deci(ids).logits, nas(ids).logits)


def _set_block(index: int, part: str, **values):
    def change(config):
        config["block_configs"][index][part].update(values)

    return change


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        (
            {"block_configs": _set_block(3, "attention", no_op=False, sparsify={"x": 1})},
            "block_configs[3].attention.sparsify",
        ),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling.rope_type"),
        ({"attention_bias": True}, "attention_bias"),
        ({"block_configs": lambda c: c["block_configs"].pop()}, "num_hidden_layers"),
    ],
)
def test_bad_configs_are_refused_naming_the_field(mixed_ckpt, tmp_path, changes, named):
    ckpt = copy_ckpt(mixed_ckpt, tmp_path / "bad")
    edit_config(ckpt, **changes)
    with pytest.raises(ConfigError, match=named.replace("[", r"\[").replace("]", r"\]")):
        AutoConfig.from_pretrained(ckpt)


def test_tensor_shape_not_matching_the_config_is_named(mixed_ckpt, tmp_path):
    ckpt = copy_ckpt(mixed_ckpt, tmp_path / "shape")
    edit_config(ckpt, block_configs=_set_block(0, "attention", n_heads_in_group=4))
    with pytest.raises(
        CheckpointError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight.*shape"
    ):
        load_reference_model(ckpt)


def test_tensor_missing_for_the_config_is_named(mixed_ckpt, tmp_path):
    ckpt = copy_ckpt(mixed_ckpt, tmp_path / "missing")
    # Block 5 is fully empty in the checkpoint; a config that gives it an MLP needs its tensors.
    edit_config(ckpt, block_configs=_set_block(5, "ffn", no_op=False, ffn_mult=1.0))
    with pytest.raises(
        CheckpointError, match=r"model\.layers\.5\.post_attention_layernorm\.weight.*missing"
    ):
        load_reference_model(ckpt)


def test_config_round_trips_through_its_dict():
    config = DeciLMConfig(
        hidden_size=64,
        num_attention_heads=4,
        num_hidden_layers=1,
        vocab_size=10,
        rope_theta=1e4,
        block_configs=[{"attention": {"n_heads_in_group": 2}, "ffn": {"ffn_mult": 1.0}}],
    )
    again = DeciLMConfig.from_dict(config.to_dict())
    assert again.plan.layers == config.plan.layers
    assert again.rope_parameters == config.rope_parameters
    assert config.to_dict()["rope_scaling"] is None

"""`builder generate`, and bad checkpoints through the CLI: exit 2, the file named, no traceback."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from builder.cli import main


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def pickle_copy(source: Path, target: Path) -> Path:
    """The same checkpoint with its weights as pytorch_model.bin instead of safetensors."""
    target.mkdir()
    for file in source.iterdir():
        if file.suffix in (".json", ".jinja") and file.name not in (
            "model.safetensors.index.json",
            "manifest.json",
        ):
            shutil.copy(file, target / file.name)
    state = {}
    for shard in sorted(source.glob("*.safetensors")):
        state.update(load_file(str(shard)))
    torch.save(state, target / "pytorch_model.bin")
    return target


def test_generate_json(mixed_ckpt):
    result = run("generate", mixed_ckpt, "--prompt", "Hello", "--max-new-tokens", "3", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["reasoning"] is False and isinstance(data["reply"], str)


def test_pickle_weights_refused_then_accepted_with_flag(mixed_ckpt, tmp_path):
    ckpt = pickle_copy(mixed_ckpt, tmp_path / "pickled")
    refused = run("generate", ckpt, "--max-new-tokens", "2")
    assert refused.exit_code == 2
    assert "pytorch_model.bin" in refused.stderr and "--allow-pickle" in refused.stderr
    assert "Traceback" not in refused.output
    accepted = run("generate", ckpt, "--max-new-tokens", "2", "--allow-pickle", "--json")
    assert accepted.exit_code == 0, accepted.output
    assert json.loads(accepted.stdout)["checkpoint"] == str(ckpt)


def test_truncated_safetensors_named(mixed_ckpt, tmp_path):
    ckpt = tmp_path / "truncated"
    shutil.copytree(mixed_ckpt, ckpt)
    shard = min(ckpt.glob("model-*.safetensors"))
    os.truncate(shard, shard.stat().st_size // 2)
    result = run("generate", ckpt)
    assert result.exit_code == 2
    assert shard.name in result.stderr and "unreadable safetensors" in result.stderr
    assert "Traceback" not in result.output


def test_unreadable_config_named(mixed_ckpt, tmp_path):
    ckpt = tmp_path / "badjson"
    shutil.copytree(mixed_ckpt, ckpt)
    (ckpt / "config.json").write_text("{not json")
    result = run("generate", ckpt)
    assert result.exit_code == 2
    assert "config.json" in result.stderr and "not valid JSON" in result.stderr

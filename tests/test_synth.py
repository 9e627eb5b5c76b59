"""Synthetic checkpoints: published layout, the preset's pattern kept, seeded weights."""

from __future__ import annotations

import json

import pytest
import torch

from builder.arch import AttentionKind, hf_tensor_shapes, load_plan, preset_plan
from builder.dtypes import BF16
from builder.errors import UserError
from builder.io.checkpoint import HFCheckpoint
from builder.io.manifest import read_manifest, verify_files
from builder.synth import SynthSpec, parse_layer_spec, synth_config, write_synthetic


def test_mixed_checkpoint_layout(mixed_ckpt):
    files = sorted(p.name for p in mixed_ckpt.iterdir())
    assert "config.json" in files and "model.safetensors.index.json" in files
    assert "tokenizer.json" in files and "tokenizer_config.json" in files
    assert any(name.startswith("model-00001-of-") for name in files)
    plan = load_plan(mixed_ckpt)
    ckpt = HFCheckpoint(mixed_ckpt)
    expected = hf_tensor_shapes(plan)
    assert {n: t.shape for n, t in ckpt.tensors.items()} == expected
    # Dtypes compare equal to torch dtypes but hash by name: compare the torch-free ones.
    assert {t.dtype for t in ckpt.tensors.values()} == {BF16}
    assert verify_files(mixed_ckpt, read_manifest(mixed_ckpt)) == []


def test_ultra_pattern_is_kept_at_reduced_size():
    config = synth_config(SynthSpec(preset="ultra-253b"))
    from builder.arch import parse_config

    plan, ultra = parse_config(config), preset_plan("ultra-253b")
    assert plan.num_layers == 162 and plan.hidden_size == 256
    assert [lay.attention for lay in plan.layers] == [lay.attention for lay in ultra.layers]
    assert [lay.ffn for lay in plan.layers] == [lay.ffn for lay in ultra.layers]
    assert {lay.kv_heads for lay in plan.layers if lay.attention is AttentionKind.ATTENTION} == {8}
    widths = [lay.ffn_width for lay in plan.layers if lay.ffn_width]
    assert widths.index(max(widths)) == [
        lay.ffn_width for lay in ultra.layers if lay.ffn_width
    ].index(425984)
    assert "auto_map" not in config


def test_layer_selection_and_seeded_weights(tmp_path):
    spec = SynthSpec(preset="ultra-253b", hidden=64, layers="0-1,134")
    a = write_synthetic(tmp_path / "a", spec)
    b = write_synthetic(tmp_path / "b", SynthSpec(preset="ultra-253b", hidden=64, layers="0-3,134"))
    plan = load_plan(a)
    assert plan.num_layers == 3 and plan.layers[2].ffn_width == 1792  # int(2*39*64/3)=1664 -> 1792
    ca, cb = HFCheckpoint(a), HFCheckpoint(b)
    name = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(ca.read(name), cb.read(name))  # same tensor name, same seed
    other = write_synthetic(
        tmp_path / "c", SynthSpec(preset="ultra-253b", hidden=64, layers="0-1,134", seed=1)
    )
    assert not torch.equal(ca.read(name), HFCheckpoint(other).read(name))


def test_target_size_grows_hidden(tmp_path):
    spec = SynthSpec(preset="mixed", target_bytes=40_000_000)
    out = write_synthetic(tmp_path / "big", spec, shard_bytes=10_000_000)
    plan = load_plan(out)
    assert plan.total_bytes("bfloat16") >= 40_000_000
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 4


def test_tokenizer_has_chat_template(mixed_ckpt):
    from transformers import PreTrainedTokenizerFast

    from builder.chat import messages

    tok = PreTrainedTokenizerFast.from_pretrained(mixed_ckpt)
    text = tok.apply_chat_template(
        messages("hi", reasoning=True), tokenize=False, add_generation_prompt=True
    )
    assert "detailed thinking on" in text and text.endswith(
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    ids = tok("héllo")["input_ids"]
    assert tok.decode(ids) == "héllo"
    assert max(ids) < load_plan(mixed_ckpt).vocab_size


@pytest.mark.parametrize("spec", ["5-2", "0-999", "a-b", ""])
def test_bad_layer_specs(spec):
    with pytest.raises(UserError, match="--layers"):
        parse_layer_spec(spec, 162)


def test_existing_output_is_not_overwritten(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(UserError, match="already exists"):
        write_synthetic(tmp_path / "x", SynthSpec(preset="mixed"))

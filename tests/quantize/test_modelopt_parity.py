"""Our writers against ModelOpt's own exporters, on a Llama-shaped checkpoint.

A nemotron-nas checkpoint whose blocks are all full attention + MLP of one shape is a Llama,
so ModelOpt's `export_hf_checkpoint` and `export_tensorrt_llm_checkpoint(decoder_type="llama")`
run on the calibrated transformers Llama give the reference files; our streaming writers get
the same checkpoint on disk plus the amax table read from that same calibrated model.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from builder.arch import load_plan
from builder.io.checkpoint import HFCheckpoint
from builder.quantize.amax import AmaxTable, quantizer_amax
from builder.quantize.blockwise import (
    CalibOptions,
    ModelParts,
    calibrate_blockwise,
    calibrate_model,
)
from builder.quantize.export_hf import write_unified_hf
from builder.quantize.export_trtllm import write_trtllm_fp8
from builder.quantize.recipe import quiet

from .twins import VOCAB, llama_twin

# Numeric comparisons run on one torch thread, so summation order does not depend on the
# machine's core count (see one_torch_thread in tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_torch_thread")

FP8 = torch.float8_e4m3fn


def windows(count: int = 4, seq: int = 32) -> torch.Tensor:
    return torch.randint(0, VOCAB, (count, seq), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def twin(tmp_path_factory):
    return llama_twin(tmp_path_factory.mktemp("twin") / "llama", layers=2)


@pytest.fixture(scope="module", params=[True, False], ids=["kv-fp8", "kv-none"])
def calibrated(request, twin):
    """(calibrated Llama, its amax table read from ModelOpt's quantizers, kv flag)."""
    model, _ = twin
    quantized = copy.deepcopy(model)
    table = calibrate_model(quantized, windows(), kv_cache=request.param, batch_size=2)
    return quantized, table, request.param


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype == FP8:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    return torch.equal(a, b)


def test_hf_export_equals_export_hf_checkpoint(tmp_path, twin, calibrated):
    from modelopt.torch.export import export_hf_checkpoint

    _, ckpt_dir = twin
    model, table, kv = calibrated
    ref_dir, ours = tmp_path / "modelopt", tmp_path / "ours"
    with quiet():
        export_hf_checkpoint(copy.deepcopy(model), dtype=torch.bfloat16, export_dir=ref_dir)
    ours.mkdir()
    write_unified_hf(ours, load_plan(ckpt_dir), HFCheckpoint(ckpt_dir), table)
    ref, got = load_file(ref_dir / "model.safetensors"), load_file(ours / "model.safetensors")
    assert set(ref) == set(got)
    assert [name for name in ref if not same(ref[name], got[name])] == []
    assert ("model.layers.0.self_attn.k_proj.k_scale" in got) is kv
    assert json.loads((ours / "hf_quant_config.json").read_text()) == json.loads(
        (ref_dir / "hf_quant_config.json").read_text()
    )
    ref_config = json.loads((ref_dir / "config.json").read_text())
    our_config = json.loads((ours / "config.json").read_text())
    assert our_config["quantization_config"] == ref_config["quantization_config"]
    assert len(our_config["block_configs"]) == 2


def test_exported_scales_are_modelopt_amax_over_448(tmp_path, twin, calibrated):
    _, ckpt_dir = twin
    model, table, kv = calibrated
    (tmp_path / "hf").mkdir()
    write_unified_hf(tmp_path / "hf", load_plan(ckpt_dir), HFCheckpoint(ckpt_dir), table)
    hf = load_file(tmp_path / "hf" / "model.safetensors")
    checked = 0
    for name, quantizer in model.named_modules():
        if not name.endswith("_quantizer") or not quantizer.is_enabled:
            continue
        module, kind = name.rsplit(".", 1)
        expected = (quantizer._amax.float() / 448.0).item()
        if kind == "weight_quantizer":
            assert hf[f"{module}.weight_scale"].item() == expected, name
        elif kind == "input_quantizer":
            assert hf[f"{module}.input_scale"].item() == expected, name
        else:
            proj = "k_proj.k_scale" if kind == "k_bmm_quantizer" else "v_proj.v_scale"
            assert hf[f"{module}.{proj}"].item() == expected, name
        checked += 1
    assert checked == 2 * (7 * 2 + (2 if kv else 0))


@pytest.mark.parametrize("tp", [1, 2])
def test_trtllm_export_equals_export_tensorrt_llm_checkpoint(tmp_path, twin, calibrated, tp):
    from modelopt.torch.export import export_tensorrt_llm_checkpoint

    _, ckpt_dir = twin
    model, table, kv = calibrated
    ref_dir, ours = tmp_path / "modelopt", tmp_path / "ours"
    with quiet():
        export_tensorrt_llm_checkpoint(
            copy.deepcopy(model),
            decoder_type="llama",
            dtype=torch.bfloat16,
            export_dir=ref_dir,
            inference_tensor_parallel=tp,
        )
    write_trtllm_fp8(ckpt_dir, ours, table, tp=tp)
    ref_embedding = []
    for rank in range(tp):
        # TensorRT-LLM renames .mlp. to .ffn. on load; ModelOpt writes the former.
        ref = {
            k.replace(".mlp.", ".ffn."): v
            for k, v in load_file(ref_dir / f"rank{rank}.safetensors").items()
        }
        got = load_file(ours / f"rank{rank}.safetensors")
        # We emit only the merged KV scale (trtllm-checkpoint.md §5); ModelOpt adds k_/v_ ones.
        extra = {
            k
            for k in ref
            if k.endswith(("k_cache_scaling_factor", "v_cache_scaling_factor")) and "kv_" not in k
        }
        assert set(ref) - extra == set(got)
        ref_embedding.append(ref.pop("transformer.vocab_embedding.weight"))
        differ = [
            k for k in got if k != "transformer.vocab_embedding.weight" and not same(ref[k], got[k])
        ]
        assert differ == []
        if kv:
            assert got["transformer.layers.0.attention.kv_cache_scaling_factor"].item() >= 1.0
    # ModelOpt shards the embedding by vocabulary (use_parallel_embedding); we replicate it.
    assert same(torch.cat(ref_embedding), got["transformer.vocab_embedding.weight"])
    ref_quant = json.loads((ref_dir / "config.json").read_text())["quantization"]
    assert json.loads((ours / "config.json").read_text())["quantization"] == ref_quant


def test_blockwise_equals_whole_model_on_llama(twin):
    from transformers import LlamaForCausalLM

    model, ckpt_dir = twin
    whole = calibrate_model(copy.deepcopy(model), windows(), kv_cache=True, batch_size=2)
    parts = ModelParts(LlamaForCausalLM, model.config)
    result = calibrate_blockwise(
        HFCheckpoint(ckpt_dir), load_plan(ckpt_dir), parts, windows(), CalibOptions(batch_size=2)
    )
    assert result.table.values == whole.values
    assert len(whole.values) == 2 * 16


def test_table_reads_every_enabled_quantizer(calibrated):
    model, table, kv = calibrated
    found = quantizer_amax(model)
    assert found == table.values
    assert all(v > 0 for v in found.values())
    assert isinstance(table, AmaxTable) and table.kv_cache is kv


def test_hf_export_equals_export_hf_checkpoint_on_every_block_kind(tmp_path, mixed_ckpt):
    """The native nemotron-nas model (GQA with 1-8 KV heads, linear and no-op parts, empty
    blocks) exported whole by ModelOpt, against our streaming writer with its amax table."""
    from modelopt.torch.export import export_hf_checkpoint

    from builder.model import load_reference_model

    model = load_reference_model(mixed_ckpt, dtype=torch.bfloat16)
    table = calibrate_model(model, windows(seq=24).clamp(5, 260), kv_cache=True, batch_size=2)
    with quiet():
        export_hf_checkpoint(model, dtype=torch.bfloat16, export_dir=tmp_path / "modelopt")
    (tmp_path / "ours").mkdir()
    write_unified_hf(tmp_path / "ours", load_plan(mixed_ckpt), HFCheckpoint(mixed_ckpt), table)
    ref = {}
    for shard in (tmp_path / "modelopt").glob("*.safetensors"):
        ref.update(load_file(shard))
    got = load_file(tmp_path / "ours" / "model.safetensors")
    assert set(ref) == set(got)
    assert [name for name in ref if not same(ref[name], got[name])] == []
    ref_config = json.loads((tmp_path / "modelopt" / "config.json").read_text())
    our_config = json.loads((tmp_path / "ours" / "config.json").read_text())
    for key in ("quantization_config", "block_configs", "rope_scaling"):
        assert our_config[key] == ref_config[key], key


def _modelopt_cfg(name: str, quantizer: str) -> dict:
    """One quantizer's settings from a ModelOpt preset config."""
    from builder.quantize.recipe import mtq

    entries = getattr(mtq(), name)["quant_cfg"]
    return next(e["cfg"] for e in entries if e.get("quantizer_name") == quantizer)


def _assert_mixed_export_equals_modelopt(tmp_path, twin, per_module: list, recipe) -> dict:
    """ModelOpt quantizes the twin with FP8_DEFAULT_CFG plus `per_module` entries and exports;
    our streaming writer with `recipe` must write the same tensors bit for bit, the same
    hf_quant_config.json and quantization_config. Returns our tensors."""
    from modelopt.torch.export import export_hf_checkpoint

    from builder.quantize.recipe import mtq

    model, ckpt_dir = twin
    quant = mtq()
    config = copy.deepcopy(quant.FP8_DEFAULT_CFG)
    config["quant_cfg"] = list(config["quant_cfg"]) + per_module
    data = windows()
    mixed = copy.deepcopy(model)
    with quiet(), torch.no_grad():
        quant.quantize(mixed, config, lambda m: [m(b[None], use_cache=False) for b in data])
        export_hf_checkpoint(mixed, dtype=torch.bfloat16, export_dir=tmp_path / "modelopt")
    table = calibrate_model(copy.deepcopy(model), data, kv_cache=False, batch_size=1)
    ours = tmp_path / "ours"
    ours.mkdir()
    write_unified_hf(ours, load_plan(ckpt_dir), HFCheckpoint(ckpt_dir), table, recipe=recipe)
    ref = load_file(tmp_path / "modelopt" / "model.safetensors")
    got = load_file(ours / "model.safetensors")
    assert set(ref) == set(got)
    assert [name for name in ref if not same(ref[name], got[name])] == []
    ref_q = json.loads((tmp_path / "modelopt" / "hf_quant_config.json").read_text())
    our_q = json.loads((ours / "hf_quant_config.json").read_text())
    assert our_q == ref_q
    ref_config = json.loads((tmp_path / "modelopt" / "config.json").read_text())
    our_config = json.loads((ours / "config.json").read_text())
    assert our_config["quantization_config"] == ref_config["quantization_config"]
    return got


def test_mixed_precision_hf_export_equals_export_hf_checkpoint(tmp_path, twin):
    """Block 0 per-tensor FP8, block 1's MLP per-channel-per-token, block 1's attention BF16:
    ModelOpt quantizes the twin that way (its FP8_PER_CHANNEL_PER_TOKEN_CFG quantizer settings
    per module) and exports; our streaming writer with the same recipe writes the same bits,
    hf_quant_config.json (MIXED_PRECISION, quantized_layers) and quantization_config."""
    from builder.quantize.formats import LinearFormat, Recipe

    cfg = "FP8_PER_CHANNEL_PER_TOKEN_CFG"
    per_module = [
        {
            "quantizer_name": "*layers.1.mlp*weight_quantizer",
            "cfg": _modelopt_cfg(cfg, "*weight_quantizer"),
        },
        {
            "quantizer_name": "*layers.1.mlp*input_quantizer",
            "cfg": _modelopt_cfg(cfg, "*input_quantizer"),
        },
        {"quantizer_name": "*layers.1.self_attn*", "enable": False},
    ]
    pc, bf16 = LinearFormat.FP8_PC_PT, LinearFormat.BF16
    recipe = Recipe(LinearFormat.FP8, {"1.qkv": bf16, "1.o": bf16, "1.gate_up": pc, "1.down": pc})
    got = _assert_mixed_export_equals_modelopt(tmp_path, twin, per_module, recipe)
    assert got["model.layers.1.mlp.down_proj.weight_scale"].shape == (
        got["model.layers.1.mlp.down_proj.weight"].shape[0],
    )


def test_w8a16_hf_export_equals_export_hf_checkpoint(tmp_path, twin):
    """Block 1's attention INT8 weight-only (ModelOpt's INT8_WEIGHT_ONLY_CFG weight quantizer,
    input quantizer off), block 1's MLP BF16, block 0 per-tensor FP8: our writer with the same
    recipe writes the same bits (int8 codes, fp32 [out] scales), hf_quant_config.json ("W8A16"
    per layer) and quantization_config."""
    from builder.quantize.formats import LinearFormat, Recipe

    per_module = [
        {
            "quantizer_name": "*layers.1.self_attn*weight_quantizer",
            "cfg": _modelopt_cfg("INT8_WEIGHT_ONLY_CFG", "*weight_quantizer"),
        },
        {"quantizer_name": "*layers.1.self_attn*input_quantizer", "enable": False},
        {"quantizer_name": "*layers.1.mlp*", "enable": False},
    ]
    w8, bf16 = LinearFormat.W8A16, LinearFormat.BF16
    recipe = Recipe(LinearFormat.FP8, {"1.qkv": w8, "1.o": w8, "1.gate_up": bf16, "1.down": bf16})
    got = _assert_mixed_export_equals_modelopt(tmp_path, twin, per_module, recipe)
    assert got["model.layers.1.self_attn.o_proj.weight"].dtype == torch.int8
    layers = json.loads((tmp_path / "ours" / "hf_quant_config.json").read_text())
    entry = layers["quantization"]["quantized_layers"]["model.layers.1.self_attn.o_proj"]
    assert entry == {"quant_algo": "W8A16"}

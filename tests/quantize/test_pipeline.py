"""`quantize_checkpoint` end to end on the mixed checkpoint (every block kind), tp=2."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from builder.arch import load_plan
from builder.arch.plan import AttentionKind
from builder.io.checkpoint import HFCheckpoint
from builder.io.manifest import read_manifest, verify_files
from builder.quantize.amax import AmaxTable, layer_linears
from builder.quantize.pipeline import quantize_checkpoint

# Numeric comparisons run on one torch thread, so summation order does not depend on the
# machine's core count (see one_torch_thread in tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_torch_thread")

FP8 = torch.float8_e4m3fn


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, mixed_ckpt):
    out = tmp_path_factory.mktemp("quant") / "mixed-fp8"
    summary = quantize_checkpoint(
        mixed_ckpt, out, tp=2, calib_size=8, calib_seq_len=32, batch_size=4
    )
    return summary, out


def test_outputs_appear_complete_with_manifests(quantized, mixed_ckpt):
    summary, out = quantized
    assert sorted(p.name for p in out.iterdir()) == ["amax.json", "hf", "manifest.json", "trtllm"]
    assert not any(p.name.startswith(f".{out.name}") for p in out.parent.iterdir())
    manifest = read_manifest(out)
    assert verify_files(out, manifest) == []
    for sub in ("trtllm", "hf"):
        sub_manifest = read_manifest(out / sub)
        assert verify_files(out / sub, sub_manifest) == []
        assert sub_manifest["calibration"]["sha256"] == summary.calibration["sha256"]
        assert sub_manifest["quantization"]["producer"] == {
            "name": "nvidia-modelopt",
            "version": "0.47.0",
        }
        assert sub_manifest["amax"] == summary.amax
    assert manifest["run"]["peak_rss_bytes"] == summary.peak_rss_bytes > 0
    plan = load_plan(mixed_ckpt)
    assert summary.blocks["blocks_empty_skipped"] == len(plan.empty_layers)
    assert set(summary.amax) == {f"layer {lay.index}" for lay in plan.layers if not lay.is_empty}
    assert summary.calibration["size"] == 8 and summary.calibration["seq_len"] == 32


def test_trtllm_checkpoint_holds_fp8_with_modelopt_scales(quantized, mixed_ckpt):
    _, out = quantized
    config = json.loads((out / "trtllm" / "config.json").read_text())
    assert config["quantization"] == {
        "quant_algo": "FP8",
        "kv_cache_quant_algo": "FP8",
        "exclude_modules": ["lm_head"],
    }
    assert config["mapping"]["tp_size"] == 2
    table = AmaxTable.load(out / "amax.json")
    plan = load_plan(mixed_ckpt)
    for rank in range(2):
        tensors = load_file(out / "trtllm" / f"rank{rank}.safetensors")
        for name in (
            "lm_head.weight",
            "transformer.vocab_embedding.weight",
            "transformer.ln_f.weight",
        ):
            assert tensors[name].dtype == torch.bfloat16
        for layer in plan.layers:
            p = f"transformer.layers.{layer.index}."
            if layer.attention is AttentionKind.ATTENTION:
                q = f"model.layers.{layer.index}.self_attn."
                w_amax = max(table.weight(q + m) for m in ("q_proj", "k_proj", "v_proj"))
                assert tensors[p + "attention.qkv.weight"].dtype == FP8
                assert (
                    tensors[p + "attention.qkv.weights_scaling_factor"].item()
                    == (torch.tensor([w_amax]) / 448.0).item()
                )
                k, v = table.kv(layer.index)
                assert tensors[p + "attention.kv_cache_scaling_factor"].item() == max(
                    k / 448, v / 448, 1.0
                )
            norms = [n for n in tensors if n.startswith(p) and "layernorm" in n]
            assert all(tensors[n].dtype == torch.bfloat16 for n in norms)
        scales = [n for n in tensors if n.endswith("scaling_factor")]
        assert scales and all(
            tensors[n].shape == (1,) and tensors[n].dtype == torch.float32 for n in scales
        )


def test_hf_checkpoint_is_unified_fp8(quantized, mixed_ckpt):
    _, out = quantized
    hf = out / "hf"
    assert json.loads((hf / "hf_quant_config.json").read_text())["quantization"] == {
        "quant_algo": "FP8",
        "kv_cache_quant_algo": "FP8",
        "exclude_modules": ["lm_head", "model.embed_tokens"],
    }
    config = json.loads((hf / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "modelopt"
    assert (
        config["block_configs"]
        == json.loads((mixed_ckpt / "config.json").read_text())["block_configs"]
    )
    table = AmaxTable.load(out / "amax.json")
    ckpt = HFCheckpoint(hf)
    plan = load_plan(mixed_ckpt)
    for layer in plan.layers:
        for module in layer_linears(plan, layer):
            assert ckpt.info(f"{module}.weight").dtype == FP8
            assert (
                ckpt.read(f"{module}.weight_scale").item()
                == (torch.tensor(table.weight(module)) / 448.0).item()
            )
        has_kv = f"model.layers.{layer.index}.self_attn.k_proj.k_scale" in ckpt
        assert has_kv == (layer.attention is AttentionKind.ATTENTION)
    assert ckpt.info("model.embed_tokens.weight").dtype == torch.bfloat16
    assert (hf / "tokenizer.json").is_file()


def test_executor_fp8_semantics_match_modelopt_fake_quant(tmp_path, quantized, mixed_ckpt):
    """Block by block from identical inputs: builder.runtime's emulated FP8 GEMMs and FP8 KV
    cache on the tp=2 TensorRT-LLM checkpoint against ModelOpt's fake-quant model.

    Per block, because FP8 rounding is discontinuous: any 1e-7 difference upstream flips
    some downstream roundings, so end-to-end errors grow with depth for any two
    implementations. ModelOpt's fake quant rounds v * (448 / amax) while its exporters (and
    ours, bit for bit) round v / (amax / 448); the two break exact E4M3 midpoints differently,
    and bf16 weights (or a token attending only to itself, whose attention output is an E4M3
    V row) often sit exactly on one. So the fake-quant model gets the exported weights (each
    an E4M3 grid point: no ties), and positions must agree to 1e-5, bar rare midpoint flips.

    Tolerances, derived:
    - 0.3 * fp8_effect: the FP8 effect (unquantized block vs fake quant) is the sum of the
      weight and the activation roundings, independent and of similar size, so an
      implementation missing either one is still at least 1/sqrt(2) ~ 0.7 of it away;
      matching semantics are far below. 0.3 separates the two with margin both ways.
    - per position, without any flipped E4M3 rounding the two differ by fp32 rounding only:
      ~ROUNDINGS_PER_BLOCK (14) unit roundoffs of 2^-24 ~ 1e-6 relative, so a median below
      1e-5 (10x) says most positions have no flip. One flipped rounding moves one element by
      an E4M3 step (2^-3 of it), ~1e-3 of a 256-wide update's norm, far above 1e-4; a flip
      needs a value within fp32 noise (~1e-6) of a midpoint of the 2^-4-wide E4M3 rounding
      interval, probability ~2e-5 per value, ~2000 quantized values per position: ~4% of
      positions. Hence at least 90% below 1e-4.
    """
    from builder.model import load_reference_model
    from builder.quantize.export_trtllm import write_trtllm_fp8
    from builder.runtime import TrtllmCheckpointExecutor
    from builder.verify.fp8_accuracy import fake_quant_model

    _, out = quantized
    dtype = torch.float32
    table = AmaxTable.load(out / "amax.json")
    plan = load_plan(mixed_ckpt)
    write_trtllm_fp8(mixed_ckpt, tmp_path / "tp1", table, tp=1)
    fake = fake_quant_model(mixed_ckpt, table, dtype, "cpu", trtllm_grid=True)
    own_rounding = record_blocks(fake, IDS)
    load_exported_weights(fake, load_file(tmp_path / "tp1" / "rank0.safetensors"), plan)
    plain = load_reference_model(mixed_ckpt, dtype=dtype)
    blocks = record_blocks(fake, IDS)
    position_errors = []
    with TrtllmCheckpointExecutor(out / "trtllm", dtype=dtype) as executor:
        cos, sin = executor.rope_tables(IDS.shape[1])
        ranks = executor.stage_ranks(0)
        pe = fake.model.rotary_emb(blocks[0][0], torch.arange(IDS.shape[1])[None])
        for lay in [lay for lay in plan.layers if not lay.is_empty]:
            x, expected = blocks[lay.index]
            x_own, expected_own = own_rounding[lay.index]
            with torch.no_grad():
                got = executor.layer(x, lay, lay.index, ranks, cos, sin)
                got_own = executor.layer(x_own, lay, lay.index, ranks, cos, sin)
                bf = plain.model.layers[lay.index](x, position_embeddings=pe)
            diff = (got - expected).norm(dim=-1) / (expected - x).norm(dim=-1)
            position_errors.append(diff.flatten())
            fp8_effect = rel(bf - x, expected - x)
            assert rel(got - x, expected - x) < 0.3 * fp8_effect, lay.index
            assert rel(got_own - x_own, expected_own - x_own) < 0.3 * fp8_effect, lay.index
    errors = torch.cat(position_errors)
    assert errors.median() < 1e-5
    assert (errors < 1e-4).float().mean() > 0.9  # ~4% of positions expected to flip (above)


IDS = torch.randint(5, 261, (1, 40), generator=torch.Generator().manual_seed(11))


def load_exported_weights(model, tensors, plan) -> None:
    """Give the model the dequantized E4M3 weights of a tp=1 TensorRT-LLM checkpoint."""

    def grid(name):
        return tensors[f"{name}.weight"].float() * tensors[f"{name}.weights_scaling_factor"]

    with torch.no_grad():
        for lay in plan.layers:
            block, p = model.model.layers[lay.index], f"transformer.layers.{lay.index}."
            if lay.attention is AttentionKind.ATTENTION:
                attn = block.self_attn
                q, k, v = grid(p + "attention.qkv").split(
                    [attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features]
                )
                for linear, w in ((attn.q_proj, q), (attn.k_proj, k), (attn.v_proj, v)):
                    linear.weight.copy_(w)
                attn.o_proj.weight.copy_(grid(p + "attention.dense"))
            elif lay.attention is AttentionKind.LINEAR:
                block.self_attn.linear_attn.weight.copy_(grid(p + "attention"))
            if lay.ffn.value == "mlp":
                block.mlp.gate_proj.weight.copy_(grid(p + "ffn.fc"))
                block.mlp.up_proj.weight.copy_(grid(p + "ffn.gate"))
                block.mlp.down_proj.weight.copy_(grid(p + "ffn.proj"))
            elif lay.ffn.value == "linear":
                block.mlp.linear_mlp.weight.copy_(grid(p + "ffn"))


def record_blocks(model, ids):
    """(input, output) of every decoder block in one forward."""
    seen = []
    hooks = [
        layer.register_forward_hook(
            lambda m, args, kwargs, out: seen.append((args[0], out)), with_kwargs=True
        )
        for layer in model.model.layers
    ]
    with torch.no_grad():
        model(ids, use_cache=False)
    for hook in hooks:
        hook.remove()
    return seen


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def test_cli_json_and_help(tmp_path, mixed_ckpt):
    from builder.cli import main

    runner = CliRunner()
    help_text = runner.invoke(main, ["quantize", "--help"]).output
    assert "--kv-cache" in help_text and "--resume" in help_text and "torchrun" in help_text
    out = tmp_path / "q"
    result = runner.invoke(
        main,
        [
            "quantize",
            str(mixed_ckpt),
            str(out),
            "--format",
            "hf",
            "--kv-cache",
            "none",
            "--calib",
            "chat",
            "--calib-size",
            "2",
            "--calib-seq-len",
            "32",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["formats"] == ["hf"] and summary["calibration"]["dataset"] == "chat"
    assert sorted(p.name for p in out.iterdir()) == ["amax.json", "hf", "manifest.json"]
    quant = json.loads((out / "hf" / "hf_quant_config.json").read_text())["quantization"]
    assert quant["kv_cache_quant_algo"] is None
    assert not any("bmm" in key for key in AmaxTable.load(out / "amax.json").values)

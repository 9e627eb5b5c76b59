"""Per-linear formats: the math, the recipe's config files, and a mixed checkpoint end to end
(both exports written, accepted by `builder check`, run by the executor and the hf runtime)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from builder.arch import load_plan
from builder.check import check_artifact
from builder.quantize.formats import (
    LinearFormat,
    Recipe,
    RecipeError,
    RowwiseFp8Linear,
    channel_scales,
    fp8_rowwise_linear,
    model_units,
    quantize_channels,
    recipe_from_hf_quantization,
)
from builder.quantize.pipeline import quantize_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FP8, PC, BF16 = LinearFormat.FP8, LinearFormat.FP8_PC_PT, LinearFormat.BF16
# e4m3 keeps 3 mantissa bits: a normal value rounds to within 2^-4 of itself (relative); below
# the smallest normal (2^-6 x scale) the spacing is 2^-9 x scale, so the error is half that.
E4M3_REL, E4M3_SUBNORMAL_ABS = 2.0**-4, 2.0**-10


def _e4m3_bound(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.maximum(E4M3_REL * w.abs(), E4M3_SUBNORMAL_ABS * scale)


def test_channel_quantization_error_is_within_one_e4m3_rounding_per_row():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 96, generator=g) * torch.logspace(-3, 1, 64)[:, None]  # rows differ
    w[5] = 0  # an all-zero row keeps a usable scale
    scales = channel_scales(w)
    assert scales.shape == (64,) and scales.dtype == torch.float32 and bool((scales > 0).all())
    q = quantize_channels(w, scales)
    assert q.dtype == torch.float8_e4m3fn
    deq = q.float() * scales[:, None]
    assert bool((deq - w).abs().le(_e4m3_bound(w, scales[:, None])).all())
    assert deq[5].abs().max() == 0
    # each row's largest value lands on 448 exactly: the whole range is used per channel
    assert bool((q.float().abs().amax(-1)[scales != 1] == 448).all())


def test_rowwise_linear_matches_an_independent_fake_quant_within_fp32_rounding():
    """The executor's GEMM (scales after the product) and the hf runtime's (dequantize, then
    multiply) are different code with the same math: they differ only by fp32 rounding,
    bounded by K x 2^-23 x sum |x w|."""
    from builder.verify.runtimes.hf import RowwiseFp8Linear as HfRowwise

    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(48, 80, generator=g), torch.randn(7, 80, generator=g) * 3
    scales = channel_scales(w)
    q = quantize_channels(w, scales)
    ours = fp8_rowwise_linear(x, q, scales)
    theirs = HfRowwise(q, scales)(x)
    bound = 80 * 2.0**-23 * (x.abs() @ (q.float() * scales[:, None]).abs().T)
    assert bool((ours - theirs).abs().le(bound).all())
    assert torch.equal(RowwiseFp8Linear(q, scales)(x), ours)


def test_per_token_activation_error_is_bounded_per_row():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 64, generator=g) * torch.tensor([1e-3, 1, 10, 100, 1e4])[:, None]
    eye = torch.eye(64)
    out = fp8_rowwise_linear(x, eye.to(torch.float8_e4m3fn), torch.ones(64))  # y = e4m3(x)
    tok = x.abs().amax(-1, keepdim=True) / 448
    assert bool((out - x).abs().le(_e4m3_bound(x, tok)).all())


@pytest.fixture(scope="module")
def plan(mixed_ckpt):
    return load_plan(mixed_ckpt)


def every_format(plan) -> Recipe:
    """Each kind of unit in each format somewhere (units cycle through the three)."""
    cycle = (FP8, PC, BF16)
    return Recipe(FP8, {u.key: cycle[i % 3] for i, u in enumerate(model_units(plan))})


def test_recipe_json_round_trip_and_errors(plan, tmp_path):
    recipe = every_format(plan)
    path = tmp_path / "r.json"
    path.write_text(json.dumps(recipe.to_json()))
    assert Recipe.load(path) == recipe
    with pytest.raises(RecipeError, match="unknown format 'int4'"):
        Recipe.from_json({"default": "int4"})
    with pytest.raises(RecipeError, match="'99.qkv' is not a linear"):
        Recipe(FP8, {"99.qkv": BF16}).validate(plan)


def test_config_files_say_mixed_precision_as_both_formats_do(plan):
    recipe = every_format(plan)
    hf = recipe.hf_quantization(plan, True, ["lm_head"])
    assert hf["quant_algo"] == "MIXED_PRECISION" and hf["kv_cache_quant_algo"] == "FP8"
    layers = hf["quantized_layers"]
    for unit in model_units(plan):
        for module in unit.hf_modules:
            fmt = recipe.format_of(unit)
            assert layers.get(module, {}).get("quant_algo") == fmt.quant_algo
    assert recipe_from_hf_quantization(plan, hf, "x").by_hf_module(plan) == recipe.by_hf_module(
        plan
    )
    trt = recipe.trtllm_layer_config(plan, False, 1)
    assert trt["quant_algo"] == "MIXED_PRECISION" and trt["kv_cache_quant_algo"] is None
    assert trt["quantized_layers"]["transformer.layers.0.attention.qkv"] == {"quant_algo": "FP8"}
    assert "transformer.layers.0.ffn.fc" not in trt["quantized_layers"]  # 0.gate_up is BF16
    with pytest.raises(RecipeError, match="needs --pp 1"):
        recipe.trtllm_layer_config(plan, False, 2)
    uniform = Recipe.uniform(PC)
    assert uniform.trtllm_quantization(plan, True)["quant_algo"] == "FP8_PER_CHANNEL_PER_TOKEN"
    assert uniform.trtllm_layer_config(plan, True, 2) is None


@pytest.fixture(scope="module")
def mixed_out(tmp_path_factory, mixed_ckpt, plan):
    out = tmp_path_factory.mktemp("formats") / "mixed"
    quantize_checkpoint(
        mixed_ckpt, out, tp=2, calib_size=8, calib_seq_len=32, recipe=every_format(plan)
    )
    return out


def test_mixed_checkpoint_passes_check_in_both_formats(mixed_out):
    for sub in ("", "trtllm", "hf"):
        report = check_artifact(mixed_out / sub if sub else mixed_out)
        assert report.ok, report.problems


def test_mixed_trtllm_tensors(mixed_out, mixed_ckpt, plan):
    config = json.loads((mixed_out / "trtllm" / "config.json").read_text())
    assert config["quantization"]["quant_algo"] == "MIXED_PRECISION"
    layer_cfg = json.loads((mixed_out / "trtllm" / "quant_cfg.json").read_text())
    source = load_file(str(next(mixed_ckpt.glob("*.safetensors"))))
    recipe = every_format(plan)
    ranks = [load_file(str(mixed_out / "trtllm" / f"rank{r}.safetensors")) for r in range(2)]
    seen = set()
    for unit in model_units(plan):
        fmt = recipe.format_of(unit)
        for module in unit.trtllm_modules:
            name = module.format(j=unit.layer)
            assert layer_cfg["quantized_layers"].get(name, {}).get("quant_algo") == fmt.quant_algo
            weight = ranks[0][f"{name}.weight"]
            if fmt is BF16:
                assert weight.dtype == torch.bfloat16
                assert f"{name}.weights_scaling_factor" not in ranks[0]
            elif fmt is PC:
                scale = ranks[0][f"{name}.per_channel_scale"]
                assert weight.dtype == torch.float8_e4m3fn and scale.shape == (weight.shape[0],)
                assert f"{name}.activation_scaling_factor" not in ranks[0]
                if name.endswith(("attention.dense", "ffn.proj")) and unit.name in ("o", "down"):
                    # row-parallel: every rank has the scales of the whole rows
                    (hf,) = unit.hf_modules
                    full = channel_scales(source[f"{hf}.weight"].float())
                    assert torch.equal(scale, full) and torch.equal(
                        ranks[1][f"{name}.per_channel_scale"], full
                    )
            else:
                assert weight.dtype == torch.float8_e4m3fn
                assert ranks[0][f"{name}.weights_scaling_factor"].shape == (1,)
            seen.add(fmt)
    assert seen == {FP8, PC, BF16}


def test_executor_binds_each_linear_of_a_mixed_checkpoint_to_its_format_at_load(mixed_out, plan):
    """Every linear's implementation is chosen once, when the checkpoint is opened, from what
    its rank files store: the recipe's format on every rank, lm_head (excluded) unquantized."""
    from builder.arch.tensors import Role, trtllm_module
    from builder.runtime.executor import (
        DenseLinear,
        PerChannelFp8Linear,
        PerTensorFp8Linear,
        TrtllmCheckpointExecutor,
    )

    expected = {BF16: DenseLinear, FP8: PerTensorFp8Linear, PC: PerChannelFp8Linear}
    recipe = every_format(plan)
    with TrtllmCheckpointExecutor(mixed_out / "trtllm") as ex:
        for unit in model_units(plan):
            fmt = recipe.format_of(unit)
            for module in unit.trtllm_modules:
                name = module.format(j=unit.layer)
                for rank in range(ex.tp):
                    assert ex.stored_format(rank, name) is fmt, (rank, name)
                    assert isinstance(ex.linear(rank, name), expected[fmt])
        head = trtllm_module(Role.LM_HEAD)
        assert [type(p.linear) for p in ex.head] == [DenseLinear] * ex.tp
        assert all(ex.stored_format(r, head) is BF16 for r in range(ex.tp))


def test_mixed_trtllm_export_streams_only_per_tensor_linears(mixed_out, mixed_ckpt, plan):
    """io15's blockwise path (the e4m3 table, block by block) is per-tensor FP8 only: a
    per-channel linear needs its rows' amax first and a BF16 one stays as it is. Every
    linear of rank 0 holds exactly what the whole-tensor `apply` of its format gives."""
    from builder.arch.tensors import rank_tensors
    from builder.convert.split import split_tensor
    from builder.dtypes import BF16 as BF16_DTYPE
    from builder.io.checkpoint import HFCheckpoint
    from builder.quantize.amax import AmaxTable
    from builder.quantize.export_trtllm import RecipeTransform

    table = AmaxTable.load(mixed_out / "amax.json")
    source = load_file(str(next(mixed_ckpt.glob("*.safetensors"))))
    transform = RecipeTransform(table, every_format(plan), plan, HFCheckpoint(mixed_ckpt), 1)
    rank0 = load_file(str(mixed_out / "trtllm" / "rank0.safetensors"))
    seen = set()
    for item in rank_tensors(plan, 2, 1, 0):
        if not item.rule.linear or item.layer is None:
            continue
        fmt = transform.layout.format_of(item)
        assert (transform.blockwise(item, BF16_DTYPE) is not None) == (fmt is FP8), item.name
        sources = [source[s] for s in item.rule.source_names(item.layer.index)]
        whole = split_tensor(item.rule, sources, 2, 0, plan.head_dim)
        for name, tensor in transform.apply(item, whole):
            assert torch.equal(rank0[name].view(torch.uint8), tensor.view(torch.uint8)), name
        seen.add(fmt)
    assert seen == {FP8, PC, BF16}


def test_zero_per_channel_scale_in_trtllm_export_is_named(mixed_out, tmp_path):
    import shutil

    from click.testing import CliRunner
    from safetensors.torch import save_file

    from builder.cli.app import main
    from builder.io.manifest import build_manifest, read_manifest, write_manifest

    ckpt = tmp_path / "trtllm"
    shutil.copytree(mixed_out / "trtllm", ckpt)
    tensors = load_file(str(ckpt / "rank0.safetensors"))
    name = next(n for n in tensors if n.endswith(".per_channel_scale"))
    tensors[name] = torch.zeros_like(tensors[name])
    save_file(tensors, str(ckpt / "rank0.safetensors"), metadata={"format": "pt"})
    old = read_manifest(ckpt)
    fields = {k: v for k, v in old.items() if k not in ("files", "kind", "tool", "created")}
    write_manifest(ckpt, build_manifest(ckpt, old["kind"], **fields))
    result = CliRunner().invoke(main, ["check", str(ckpt)])
    assert result.exit_code == 2 and f"scale {name!r} is not positive" in result.output


def test_mixed_hf_tensors(mixed_out, plan):
    hf = json.loads((mixed_out / "hf" / "hf_quant_config.json").read_text())["quantization"]
    assert hf["quant_algo"] == "MIXED_PRECISION"
    config = json.loads((mixed_out / "hf" / "config.json").read_text())["quantization_config"]
    assert config["quant_algo"] == "MIXED_PRECISION" and config["quantized_layers"]
    tensors = load_file(str(mixed_out / "hf" / "model.safetensors"))
    recipe = every_format(plan)
    for unit in model_units(plan):
        fmt = recipe.format_of(unit)
        for m in unit.hf_modules:
            w = tensors[f"{m}.weight"]
            if fmt is BF16:
                assert w.dtype == torch.bfloat16 and f"{m}.weight_scale" not in tensors
            elif fmt is PC:
                assert tensors[f"{m}.weight_scale"].shape == (w.shape[0],)
                assert f"{m}.input_scale" not in tensors
            else:
                assert tensors[f"{m}.weight_scale"].shape == ()
                assert f"{m}.input_scale" in tensors


def _logits(artifact, ckpt, ids):
    from builder.model import load_reference_model
    from builder.runtime import TrtllmCheckpointExecutor
    from builder.verify.runtimes.hf import HfFp8Runtime

    ref = load_reference_model(ckpt, dtype=torch.float32)
    with torch.no_grad():
        bf16 = ref(ids[None], use_cache=False).logits[0].float()
    with TrtllmCheckpointExecutor(artifact / "trtllm", dtype=torch.float32) as ex:
        trt = ex(ids[None])[0].float()
    hf = HfFp8Runtime(artifact / "hf", dtype=torch.float32).logits(ids).float()
    return bf16, trt, hf


def test_mixed_artifact_runs_in_both_runtimes(mixed_out, mixed_ckpt, plan):
    """The same recipe through two independent paths: both off BF16 by FP8-sized errors of
    the same size (per-tensor TRT-LLM shares qkv / gate-up scales and floors the KV scale at
    1, the HF export does not, so they are not expected to agree bit for bit)."""
    ids = torch.randint(0, plan.vocab_size, (32,), generator=torch.Generator().manual_seed(3))
    bf16, trt, hf = _logits(mixed_out, mixed_ckpt, ids)
    trt_err, hf_err = (trt - bf16).abs().mean(), (hf - bf16).abs().mean()
    assert bool(torch.isfinite(trt).all() and torch.isfinite(hf).all())
    assert 0 < trt_err < 2 * hf_err and 0 < hf_err < 2 * trt_err


def test_uniform_per_channel_recipe(tmp_path, mixed_ckpt):
    out = tmp_path / "pc"
    quantize_checkpoint(
        mixed_ckpt, out, calib_size=4, calib_seq_len=16, recipe=Recipe.uniform(PC), kv_cache=False
    )
    config = json.loads((out / "trtllm" / "config.json").read_text())
    assert config["quantization"]["quant_algo"] == "FP8_PER_CHANNEL_PER_TOKEN"
    assert not (out / "trtllm" / "quant_cfg.json").exists()
    hf = json.loads((out / "hf" / "hf_quant_config.json").read_text())["quantization"]
    assert hf["quant_algo"] == "FP8_PER_CHANNEL_PER_TOKEN" and hf["exclude_modules"]
    assert check_artifact(out).ok
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["quantization"]["recipe"] == {"default": "fp8-pc-pt", "overrides": {}}
    # Both exports hold the same E4M3 bits and channel scales, so the executor and the hf
    # runtime differ only where fp32 rounding flips an activation's e4m3 rounding: a small
    # part of the FP8 error itself (measured 0.3x on this random model, which amplifies).
    plan = load_plan(mixed_ckpt)
    ids = torch.randint(0, plan.vocab_size, (32,), generator=torch.Generator().manual_seed(3))
    bf16, trt, hf = _logits(out, mixed_ckpt, ids)
    assert (trt - hf).abs().mean() < 0.5 * (trt - bf16).abs().mean()

"""W8A16 (INT8 weights per channel, BF16 activations): the grid, both exports as their loaders
read them, both runtimes, GPTQ onto the INT8 grid, and the auto search's use of it."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from builder.arch import load_plan
from builder.arch.formats import LINEAR_REPLACEMENTS
from builder.check import check_artifact
from builder.quantize.formats import (
    LinearFormat,
    Recipe,
    RecipeError,
    int8_channel_scales,
    model_units,
    quantize_int8_channels,
)
from builder.quantize.gptq import Grid, HessianAccumulator, gptq_chunk, nearest_codes, output_error
from builder.quantize.pipeline import quantize_checkpoint
from builder.runtime.executor import trtllm_weight_only_int8
from builder.verify.auto import Option, hull

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FP8, PC, W8, BF16 = (
    LinearFormat.FP8,
    LinearFormat.FP8_PC_PT,
    LinearFormat.W8A16,
    LinearFormat.BF16,
)


def test_int8_codes_are_within_half_a_step_of_each_weight():
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(0))
    w[5] = 0  # an all-zero row gets scale 1 and codes 0
    s = int8_channel_scales(w)
    q = quantize_int8_channels(w, s)
    assert q.dtype == torch.int8 and s[5] == 1 and not q[5].any()
    assert int(q.abs().max()) == 127  # each row's amax lands on the end of the grid
    err = (w - q.float() * s[:, None]).abs()
    assert bool((err <= s[:, None] / 2 * (1 + 1e-6)).all())


def test_trtllm_build_rounding_is_cutlass_symmetric_quantize():
    """scale = amax / 128 per output channel, codes round(W / scale) clamped to [-128, 127]
    (so the positive amax clips to 127), the scale applied in the model dtype."""
    w = torch.tensor([[1.0, -1.0, 0.5, 0.25], [0.0, 0.0, 0.0, 0.0]], dtype=torch.bfloat16)
    deq = trtllm_weight_only_int8(w)
    scale = torch.tensor(1 / 128, dtype=torch.bfloat16).float()
    assert torch.equal(deq[0], torch.tensor([127.0, -128.0, 64.0, 32.0]) * scale)
    assert not deq[1].any()


def test_gptq_on_the_int8_grid_accounts_for_its_error_and_beats_nearest():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 48, generator=g) * torch.linspace(0.2, 3, 48)
    w = torch.randn(32, 48, generator=g)
    acc = HessianAccumulator(48)
    acc.add(x)
    h = acc.dense()
    s = int8_channel_scales(w)
    codes, loss = gptq_chunk(w, h, s, damp=1e-4, grid=Grid.INT8)
    assert codes.dtype == torch.int8 and int(codes.abs().max()) <= 128
    gptq = output_error(w, codes.float() * s[:, None], h)
    nearest = output_error(w, nearest_codes(w, s, Grid.INT8).float() * s[:, None], h)
    assert gptq < nearest
    # GPTQ's own account is tr(E H_d E^T) for the damped H_d = H + d I, d = 1e-4 x mean
    # diag(H); the undamped error differs by d ||E||^2 <= 1e-4 x (mean diag / smallest
    # eigenvalue of H) of it, under 1% for these activations (channel scales 0.2 ... 3, 512
    # rows over 48 columns keep H well conditioned), plus fp32 summation at 1e-6
    assert loss == pytest.approx(gptq, rel=1e-2)


def test_auto_offers_w8a16_in_bf16s_place_priced_as_bf16():
    fp8, w8 = Option(FP8, 0.02, 100), Option(W8, 0.001, 104, price=200)
    pc = Option(PC, 0.01, 104)
    assert hull([fp8, pc, w8]) == [fp8, pc, w8]
    assert w8.cost == 200 and w8.bytes == 104


@pytest.fixture(scope="module")
def plan(mixed_ckpt):
    return load_plan(mixed_ckpt)


def w8a16_mix(plan) -> Recipe:
    """W8A16, FP8, per-channel FP8 and BF16 in turn over the GEMMs a TensorRT-LLM build can
    quantize; a linear-replacement block's linear stays FP8."""
    cycle = (W8, FP8, PC, W8, BF16)
    units = [u for u in model_units(plan) if u.name not in LINEAR_REPLACEMENTS]
    return Recipe(FP8, {u.key: cycle[i % len(cycle)] for i, u in enumerate(units)})


@pytest.fixture(scope="module")
def w8_out(tmp_path_factory, mixed_ckpt, plan):
    out = tmp_path_factory.mktemp("w8a16") / "mix"
    quantize_checkpoint(
        mixed_ckpt, out, tp=2, calib_size=4, calib_seq_len=16, recipe=w8a16_mix(plan)
    )
    return out


def test_w8a16_mix_passes_check_in_both_formats(w8_out):
    for sub in ("", "trtllm", "hf"):
        report = check_artifact(w8_out / sub if sub else w8_out)
        assert report.ok, report.problems


def test_hf_export_stores_int8_codes_as_modelopt_int8_wo(w8_out, mixed_ckpt, plan):
    hf = json.loads((w8_out / "hf" / "hf_quant_config.json").read_text())["quantization"]
    config = json.loads((w8_out / "hf" / "config.json").read_text())["quantization_config"]
    tensors = load_file(str(w8_out / "hf" / "model.safetensors"))
    src = load_file(str(next(mixed_ckpt.glob("*.safetensors"))))
    recipe = w8a16_mix(plan)
    seen = 0
    for unit in model_units(plan):
        if recipe.format_of(unit) is not W8:
            continue
        for m in unit.hf_modules:
            assert hf["quantized_layers"][m] == {"quant_algo": "W8A16"}
            assert config["quantized_layers"][m]["quant_algo"] == "W8A16"
            w, scale = tensors[f"{m}.weight"], tensors[f"{m}.weight_scale"]
            assert w.dtype == torch.int8 and scale.dtype == torch.float32
            assert scale.shape == (w.shape[0],) and f"{m}.input_scale" not in tensors
            source = src[f"{m}.weight"]
            assert torch.equal(scale, int8_channel_scales(source))
            assert torch.equal(w, quantize_int8_channels(source, scale))
            seen += 1
    assert seen


def test_trtllm_export_keeps_w8a16_weights_for_the_build(w8_out, mixed_ckpt, plan):
    layers = json.loads((w8_out / "trtllm" / "quant_cfg.json").read_text())["quantized_layers"]
    recipe = w8a16_mix(plan)
    w8_modules = {m for m, f in recipe.by_trtllm_module(plan).items() if f is W8}
    assert w8_modules and all(layers[m] == {"quant_algo": "W8A16"} for m in w8_modules)
    rank0 = load_file(str(w8_out / "trtllm" / "rank0.safetensors"))
    for m in w8_modules:
        assert rank0[f"{m}.weight"].dtype == torch.bfloat16
        assert f"{m}.per_channel_scale" not in rank0 and f"{m}.weights_scaling_factor" not in rank0


def test_both_runtimes_run_w8a16_closer_to_bf16_than_fp8(w8_out, mixed_ckpt, plan, tmp_path):
    """The W8A16 mix and the same mix with FP8 where it has W8A16: INT8's 255 levels per row
    put its error well below E4M3's 3 mantissa bits, in both runtimes."""
    from tests.quantize.test_formats import _logits

    fp8_recipe = Recipe(
        FP8, {k: (PC if v is W8 else v) for k, v in w8a16_mix(plan).overrides.items()}
    )
    fp8_out = tmp_path / "fp8"
    quantize_checkpoint(
        mixed_ckpt, fp8_out, tp=2, calib_size=4, calib_seq_len=16, recipe=fp8_recipe
    )
    ids = torch.randint(0, plan.vocab_size, (32,), generator=torch.Generator().manual_seed(3))
    bf16, trt, hf = _logits(w8_out, mixed_ckpt, ids)
    _, trt8, hf8 = _logits(fp8_out, mixed_ckpt, ids)
    for w8, f8 in ((trt, trt8), (hf, hf8)):
        assert bool(torch.isfinite(w8).all())
        assert (w8 - bf16).abs().mean() < (f8 - bf16).abs().mean()


def test_executor_binds_w8a16_from_the_config(w8_out, plan):
    from builder.runtime import TrtllmCheckpointExecutor
    from builder.runtime.executor import WeightOnlyInt8Linear

    recipe = w8a16_mix(plan)
    with TrtllmCheckpointExecutor(w8_out / "trtllm") as ex:
        for module, fmt in recipe.by_trtllm_module(plan).items():
            if fmt is W8:
                assert ex.stored_format(0, module) is W8
                assert isinstance(ex.linear(0, module), WeightOnlyInt8Linear)


def test_trtllm_export_refuses_w8a16_on_a_linear_replacement_block(tmp_path, mixed_ckpt, plan):
    unit = next(u for u in model_units(plan) if u.name in LINEAR_REPLACEMENTS)
    recipe = Recipe(FP8, {unit.key: W8})
    with pytest.raises(RecipeError, match=f"unit {unit.key}: w8a16 on a linear-replacement"):
        recipe.check_trtllm(plan)
    refused = tmp_path / "both"  # refused before calibration, nothing written
    with pytest.raises(RecipeError, match="linear-replacement"):
        quantize_checkpoint(mixed_ckpt, refused, calib_size=4, calib_seq_len=16, recipe=recipe)
    assert not refused.exists() and not list(tmp_path.glob(".both*"))
    out = tmp_path / "hf-only"
    quantize_checkpoint(
        mixed_ckpt, out, calib_size=4, calib_seq_len=16, recipe=recipe, formats=["hf"]
    )
    assert check_artifact(out / "hf").ok


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--recipe", "fp8", "--candidates", "w8a16"], "apply to --recipe auto only"),
        (["--recipe", "auto", "--max-kl", "0.1", "--candidates", "int4"], "unknown format"),
        (["--recipe", "auto", "--max-kl", "0.1", "--candidates", "bf16"], "quantized formats"),
    ],
)
def test_cli_refuses_bad_candidates(tmp_path, mixed_ckpt, extra, message):
    from builder.cli.app import main

    result = CliRunner().invoke(main, ["quantize", str(mixed_ckpt), str(tmp_path / "o"), *extra])
    assert result.exit_code == 2 and message in result.output
    assert "Traceback" not in result.output and not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def bf16_tp2(tmp_path_factory, mixed_ckpt):
    from builder.convert import convert_checkpoint

    out = tmp_path_factory.mktemp("w8a16-bf16") / "tp2"
    convert_checkpoint(mixed_ckpt, out, 2)
    return out


def a_w8a16_module(trt) -> str:
    from builder.arch.formats import trtllm_formats
    from builder.io.trtllm_checkpoint import read_trtllm_config

    _, formats = trtllm_formats(trt, read_trtllm_config(trt)[0])
    return next(m for m, f in sorted(formats.items()) if f is W8 and m.endswith("dense"))


@pytest.mark.parametrize("gemm", ["emulate", "scaled-mm"])
def test_resident_w8a16_linear_holds_the_builds_codes(w8_out, gemm):
    """A W8A16 linear is resident as TensorRT-LLM's build rounds it (int8 codes, one scale per
    output channel). Emulated it is the executor's product bit for bit; on 16-bit GEMMs
    ((x @ codes^T) x scale) each output is within (K + 1) fp32 roundings of sum |x| |w|
    (the codes times a bf16 scale are exact in fp32, so only the order of the sums differs)."""
    from builder.runtime.executor import trtllm_weight_only_codes
    from builder.runtime.resident import ResidentRuntime, WeightOnlyInt8Linear

    trt = w8_out / "trtllm"
    module = a_w8a16_module(trt)
    rt = ResidentRuntime.from_checkpoint(trt, dtype=torch.float32, max_seq=64, fp8_gemm=gemm)
    layer = int(module.split(".")[2])  # pp 1: the stage-local index is the layer's
    lin = next(p for p in rt.parts if p.name == f"layer {layer} attention").ranks[0].dense
    stored = load_file(str(trt / "rank0.safetensors"))[f"{module}.weight"]
    codes, scale = trtllm_weight_only_codes(stored)
    assert isinstance(lin, WeightOnlyInt8Linear) and stored.dtype == torch.bfloat16
    assert torch.equal(lin.codes, codes) and torch.equal(lin.scale, scale)
    assert lin.nbytes == codes.numel() + scale.nbytes
    x = torch.randn(5, codes.shape[1], generator=torch.Generator().manual_seed(3))
    weight = trtllm_weight_only_int8(stored)
    if gemm == "emulate":
        assert torch.equal(lin(x), torch.nn.functional.linear(x, weight))
    else:
        k = codes.shape[1]
        bound = (k + 1) * 2.0**-24 * (x.abs() @ weight.abs().T)
        assert bool(((lin(x) - x.double() @ weight.double().T).abs() <= bound).all())


CUDA = torch.cuda.is_available()


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU"))],
)
def test_resident_runtime_runs_a_w8a16_mix_like_the_executor(w8_out, bf16_tp2, device):
    """The mix (W8A16, FP8 per tensor and per channel, BF16) at tp 2: the runtime binds each
    linear to its format; its logits stay within what the mix's quantization costs against BF16
    (the bound of test_resident.py's every-format test: a flipped e4m3 rounding cascades), and
    emulated on the CPU it decodes the executor's greedy tokens."""
    from builder.runtime import TrtllmCheckpointExecutor, compare_logits
    from builder.runtime.resident import (
        DenseLinear,
        Fp8Linear,
        ResidentRuntime,
        RowwiseFp8Linear,
        WeightOnlyInt8Linear,
        linears_of,
    )

    trt = w8_out / "trtllm"
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with TrtllmCheckpointExecutor(trt, dtype=torch.float32) as executor:
        reference = executor(ids)
        sequence = ids
        for _ in range(3):
            step = executor(sequence)[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, step], dim=1)
    with TrtllmCheckpointExecutor(bf16_tp2, dtype=torch.float32) as executor:
        quantization_error = compare_logits(reference, executor(ids)).relative_error
    gemm = "emulate" if device == "cpu" else "scaled-mm"
    rt = ResidentRuntime.from_checkpoint(
        trt, dtype=torch.float32, max_seq=64, fp8_gemm=gemm, device=device
    )
    kinds = {type(lin) for p in rt.parts for w in p.ranks for lin in linears_of(w)}
    assert kinds == {DenseLinear, Fp8Linear, RowwiseFp8Linear, WeightOnlyInt8Linear}
    logits = rt.prefill(ids.to(device)).cpu()
    assert compare_logits(logits, reference).relative_error <= quantization_error
    tokens = rt.generate(ids.to(device), 3).cpu()
    if device == "cpu":
        assert torch.equal(tokens, sequence[:, ids.shape[1] :])


def test_resident_runtime_refuses_a_fused_group_of_two_formats(bf16_tp2):
    """fc and gate are one GEMM in the runtime, so they must share a format (recipes give a
    fused group one); a checkpoint declaring otherwise is refused, naming the rank file."""
    from builder.errors import UserError
    from builder.runtime.resident import ResidentRuntime

    with pytest.raises(
        UserError, match=r"rank0\.safetensors: .*ffn\.fc, .*ffn\.gate mix W8A16 and BF16"
    ):
        ResidentRuntime.from_checkpoint(
            bf16_tp2, max_seq=16, weight_only=lambda module: module.endswith(".fc")
        )


def test_weight_only_modules_needs_the_directory_of_a_mixed_checkpoint():
    from builder.arch.formats import MIXED_PRECISION, QUANT_CFG
    from builder.errors import UserError
    from builder.runtime.executor import weight_only_modules

    config = {"quantization": {"quant_algo": MIXED_PRECISION}}
    with pytest.raises(UserError, match=QUANT_CFG):
        weight_only_modules(None, config)
    uniform = weight_only_modules(None, {"quantization": {"quant_algo": "W8A16"}})
    assert uniform("transformer.layers.0.ffn.fc") and not uniform("lm_head")


def test_plan_counts_w8a16_at_fp8s_bytes(plan):
    from builder.deploy.recipe_memory import rank_bytes

    w8 = rank_bytes(plan, Recipe.uniform(W8), 1, 1)
    pc = rank_bytes(plan, Recipe.uniform(PC), 1, 1)
    bf16 = rank_bytes(plan, Recipe.uniform(BF16), 1, 1)
    assert w8 == pc and w8[0] < bf16[0]


def test_uniform_w8a16_recipe_in_both_formats(tmp_path, mixed_ckpt, plan):
    """One format everywhere it can be built (the linear-replacement linears stay FP8), GPTQ
    codes in the HF export, the build's own rounding in the TensorRT-LLM checkpoint."""
    recipe = Recipe(W8, {u.key: FP8 for u in model_units(plan) if u.name in LINEAR_REPLACEMENTS})
    out = tmp_path / "w8"
    quantize_checkpoint(
        mixed_ckpt, out, calib_size=4, calib_seq_len=16, recipe=recipe, rounding="gptq"
    )
    assert check_artifact(out).ok
    assert check_artifact(out / "hf").ok and check_artifact(out / "trtllm").ok
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["quantization"]["rounding"]["method"] == "gptq"
    tensors = load_file(str(out / "hf" / "model.safetensors"))
    src = load_file(str(next(mixed_ckpt.glob("*.safetensors"))))
    unit = next(u for u in model_units(plan) if recipe.format_of(u) is W8)
    module = unit.hf_modules[0]
    codes, scale = tensors[f"{module}.weight"], tensors[f"{module}.weight_scale"]
    assert codes.dtype == torch.int8 and torch.equal(
        scale, int8_channel_scales(src[f"{module}.weight"])
    )
    nearest = quantize_int8_channels(src[f"{module}.weight"], scale)
    moved = (codes.int() - nearest.int()).abs()
    assert 0 < int((moved > 0).sum()) and int(moved.max()) <= 128  # GPTQ's own codes, same grid


def test_upgrade_path_spends_the_bf16_cap_on_w8a16_at_fp8s_bytes(mixed_ckpt):
    """On every block kind with W8A16 offered: candidates that can take it never go
    BF16, those with a linear-replacement linear can only go BF16, the cap bounds both
    together, and W8A16 steps add only scale bytes."""
    from builder.deploy.recipe_memory import bf16_fraction
    from builder.verify.auto import upgrade_path
    from builder.verify.sensitivity import candidates, measure_sensitivity

    plan = load_plan(mixed_ckpt)
    windows = torch.randint(0, plan.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    sens = measure_sensitivity(mixed_ckpt, windows, None, (PC, W8), "block", torch.float32)
    units = candidates(plan, "block")
    assert all(sens.own(k, "w8a16") < sens.own(k, "fp8-pc-pt") for k in units)
    steps, _, options = upgrade_path(plan, sens, 4, 0.4)
    kinds = set()
    for key, opts in options.items():
        replacement = any(u.name in LINEAR_REPLACEMENTS for u in units[key])
        assert opts[-1].fmt is (BF16 if replacement else W8)
        kinds.add(replacement)
    assert kinds == {True, False}  # both kinds of candidate are on this checkpoint
    last = steps[-1]
    assert last.w8a16_fraction > 0 and last.bf16_fraction + last.w8a16_fraction <= 0.4 + 1e-12
    assert bf16_fraction(plan, last.recipe) == pytest.approx(last.bf16_fraction)
    for a, b in zip(steps, steps[1:], strict=False):
        assert b.kl_sum < a.kl_sum
        if b.w8a16_fraction > a.w8a16_fraction and b.bf16_fraction == a.bf16_fraction:
            # FP8 -> W8A16 adds only 4 scale bytes per output row (per-channel scales), under
            # 4 / 256 of one row's weights on this hidden-256 model, far below 1% of the total
            assert 0 <= b.bytes - a.bytes < 0.01 * a.bytes

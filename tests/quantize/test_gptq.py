"""`builder quantize --rounding gptq`: GPTQ's math (builder.quantize.gptq), its block-streamed
run with calibration, the stored codes both exports write, resume and bad input."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from builder.arch import load_plan
from builder.arch.formats import LinearFormat, Recipe, block_units
from builder.arch.tensors import linear_module, rank_tensors
from builder.convert.sources import read_plan
from builder.dtypes import FP8_MAX
from builder.quantize.fp8 import FP8
from builder.quantize.gptq import (
    GptqOptions,
    HessianAccumulator,
    damped,
    dequantized,
    gptq_chunk,
    gptq_codes,
    nearest_codes,
    output_error,
)
from builder.quantize.pipeline import quantize_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PC, FP8_PT, BF16 = LinearFormat.FP8_PC_PT, LinearFormat.FP8, LinearFormat.BF16


def correlated_inputs(tokens: int, width: int, rank: int, seed: int) -> torch.Tensor:
    """Activations whose channels are mostly a few shared directions (as a block's inputs
    are): the case GPTQ's compensation exists for."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, width, generator=g)
    x = torch.randn(tokens, rank, generator=g) @ basis
    return x + 0.05 * torch.randn(tokens, width, generator=g)


def weight(out: int, width: int, seed: int) -> torch.Tensor:
    return torch.randn(out, width, generator=torch.Generator().manual_seed(seed))


def row_scales(w: torch.Tensor) -> torch.Tensor:
    return w.abs().amax(1) / FP8_MAX


# ---- the math -------------------------------------------------------------------------------
def block_scales(w: torch.Tensor, rows: int = 8, cols: int = 64) -> torch.Tensor:
    """One scale per element: each rows x cols block's amax / 448 (block-scaled FP8)."""
    blocks = w.abs().reshape(w.shape[0] // rows, rows, w.shape[1] // cols, cols)
    amax = blocks.amax(dim=(1, 3)) / FP8_MAX
    return amax.repeat_interleave(rows, 0).repeat_interleave(cols, 1)


SCALES = {"tensor": lambda w: w.abs().max() / FP8_MAX, "row": row_scales, "block": block_scales}


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("scaling", list(SCALES))
def test_gptq_accounts_for_its_error_exactly(act_order, scaling):
    """GPTQ's bookkeeping sum_j e_j^2 / U_jj^2 is, by the OBS derivation, exactly the
    layer-output error tr((W - Q) H (W - Q)^T) under the damped H it factorised; a wrong
    update (a missing row of U, the wrong permutation, updates leaking across the lazy
    batches) breaks the identity by O(1). fp32 Cholesky on a well-damped H: 1e-3 relative."""
    x = correlated_inputs(512, 192, 12, 0)
    h = x.T @ x
    w = weight(24, 192, 1)
    scale = SCALES[scaling](w)
    codes, loss = gptq_chunk(w, h, scale, 0.01, act_order)
    assert output_error(w, dequantized(codes, scale), damped(h, 0.01)) == pytest.approx(
        loss, rel=1e-3
    )


def test_gptq_without_correlations_is_nearest_rounding():
    """With a diagonal H no column's error can be compensated by another: U is diagonal,
    the updates are zero, GPTQ must return the nearest codes bit for bit."""
    w = weight(16, 64, 2)
    h = torch.diag(torch.rand(64, generator=torch.Generator().manual_seed(3)) + 0.5)
    for scale in (row_scales(w), block_scales(w, 8, 16)):
        codes, _ = gptq_chunk(w, h, scale, 0.01, True)
        assert torch.equal(codes.view(torch.uint8), nearest_codes(w, scale).view(torch.uint8))


@pytest.mark.parametrize("per_channel", [False, True])
def test_gptq_lowers_the_layer_error_below_nearest_by_the_predicted_margin(per_channel):
    """Independent rounding errors of variance v cost nearest rounding v sum_j H_jj; GPTQ's
    account of the same errors is v sum_j 1/U_jj^2 (each column's conditional variance
    given the columns after it). The predicted ratio rho is computed from H; E4M3's step
    varies by 2x inside a binade (variance 4x) and the compensated weights are not the
    originals, so the test allows 4 rho, and rho itself must be small for correlated
    activations (else the test would not test compensation)."""
    x = correlated_inputs(1024, 256, 16, 4)
    h = x.T @ x
    w = weight(64, 256, 5)
    scale = row_scales(w) if per_channel else w.abs().max() / FP8_MAX
    hd = damped(h, 0.01)
    order = torch.argsort(torch.diagonal(hd), descending=True, stable=True)
    hp = hd[order][:, order]
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hp)), upper=True)
    rho = float((1 / torch.diagonal(u) ** 2).sum() / torch.diagonal(hp).sum())
    assert rho < 0.05
    codes, _ = gptq_chunk(w, h, scale, 0.01, True)
    nearest = output_error(w, dequantized(nearest_codes(w, scale), scale), h)
    gptq = output_error(w, dequantized(codes, scale), h)
    assert gptq < 4 * rho * nearest


def test_chunked_hessian_is_the_diagonal_blocks_of_the_full_one():
    x = correlated_inputs(300, 100, 8, 6)
    covering = HessianAccumulator(100, chunk=128)
    chunked = HessianAccumulator(100, chunk=32)
    for part in x.split(77):  # several calls, as calibration batches arrive
        covering.add(part.to(torch.bfloat16).float())
        chunked.add(part.to(torch.bfloat16).float())
    xb = x.to(torch.bfloat16).float()
    assert torch.allclose(covering.dense(), xb.T @ xb, rtol=1e-5, atol=1e-3)
    assert [c.stop - c.start for c in chunked.chunks] == [32, 32, 32, 4]
    for c, block in zip(chunked.chunks, chunked.blocks, strict=True):
        assert torch.allclose(block, (xb.T @ xb)[c, c], rtol=1e-5, atol=1e-3)
    assert covering.rows == chunked.rows == 300
    # one chunk covering the width: gptq_codes is GPTQ on the full H, bit for bit
    w = weight(8, 100, 7)
    scale = row_scales(w)
    whole, _ = gptq_chunk(w, covering.blocks[0], scale, 0.01, True)
    assert torch.equal(
        gptq_codes(w, covering, scale, GptqOptions()).view(torch.uint8), whole.view(torch.uint8)
    )


# ---- the product --------------------------------------------------------------------------------
CALIB = {"calib_size": 4, "calib_seq_len": 24, "batch_size": 2, "workers": 1}
MIXED = Recipe(PC, {"1.o": BF16, "5.qkv": FP8_PT, "10.down": FP8_PT, "0.gate_up": FP8_PT})


@pytest.fixture(scope="module")
def gptq_out(tmp_path_factory, ultra_ckpt):
    """The Ultra-pattern checkpoint, a mixed recipe (per-channel, per-tensor, BF16), GPTQ,
    both exports at tp 2."""
    out = tmp_path_factory.mktemp("gptq") / "out"
    quantize_checkpoint(ultra_ckpt, out, tp=2, recipe=MIXED, rounding="gptq", **CALIB)
    return out


def test_both_exports_carry_the_same_codes_and_scales(gptq_out, ultra_ckpt):
    """Every quantized linear of every TensorRT-LLM rank is the HF export's codes cut by
    convert's own read plan, byte for byte, with the scales the codes were made with."""
    from builder.arch.tensors import per_channel_scale_name, scale_names

    plan = load_plan(ultra_ckpt)
    hf = load_file(str(gptq_out / "hf" / "model.safetensors"))
    formats = MIXED.by_hf_module(plan)
    checked = set()
    for rank in range(2):
        rank_file = load_file(str(gptq_out / "trtllm" / f"rank{rank}.safetensors"))
        for item in rank_tensors(plan, 2, 1, rank):
            if not item.rule.linear or item.name not in rank_file:
                continue
            pieces = read_plan(plan, item, 2, rank).pieces
            fmt = formats.get(linear_module(pieces[0].source), BF16)
            if fmt is BF16:
                assert rank_file[item.name].dtype == torch.bfloat16
                continue
            expected = torch.cat([hf[p.source][p.rows, p.cols or slice(None)] for p in pieces])
            got = rank_file[item.name]
            assert got.dtype == FP8 and torch.equal(
                got.view(torch.uint8), expected.view(torch.uint8)
            )
            scales = [hf[f"{linear_module(p.source)}.weight_scale"] for p in pieces]
            if fmt is PC:
                want = torch.cat([s[p.rows] for s, p in zip(scales, pieces, strict=True)])
                assert torch.equal(rank_file[per_channel_scale_name(item.name)], want)
            else:  # one per-tensor scale for the fused GEMM, the same in both exports
                assert all(torch.equal(s, scales[0]) for s in scales)
                assert torch.equal(rank_file[scale_names(item.name)[0]], scales[0].reshape(1))
            checked.add(fmt)
    assert checked == {PC, FP8_PT}


def test_codes_are_gptq_on_the_formats_own_grid(gptq_out, ultra_ckpt):
    """Scales follow the format's rule (per-tensor: the max of the group's amax / 448, from
    the calibrated table; per-channel: each row's amax / 448); the codes are within the
    clamp and GPTQ moved some of them off nearest (else nothing was wired)."""
    from builder.io.checkpoint import HFCheckpoint
    from builder.quantize.amax import AmaxTable
    from builder.quantize.formats import channel_scales

    plan = load_plan(ultra_ckpt)
    src = HFCheckpoint(ultra_ckpt)
    table = AmaxTable.load(gptq_out / "amax.json")
    hf = load_file(str(gptq_out / "hf" / "model.safetensors"))
    moved = total = 0
    for layer in plan.layers:
        for unit in block_units(layer):
            fmt = MIXED.format_of(unit)
            if fmt is BF16:
                continue
            for module in unit.hf_modules:
                w = src.read(f"{module}.weight")
                codes, scale = hf[f"{module}.weight"], hf[f"{module}.weight_scale"]
                if fmt is FP8_PT:
                    shared = max(table.weight(m) for m in unit.hf_modules)
                    assert torch.equal(scale, torch.tensor(shared, dtype=torch.float32) / FP8_MAX)
                else:
                    assert torch.equal(scale, channel_scales(w))
                assert codes.float().abs().max() <= FP8_MAX
                near = nearest_codes(w, scale)
                moved += int((codes.view(torch.uint8) != near.view(torch.uint8)).sum())
                total += codes.numel()
    assert 0.01 < moved / total < 0.9
    manifest = json.loads((gptq_out / "manifest.json").read_text())
    assert manifest["quantization"]["rounding"]["method"] == "gptq"
    assert manifest["quantization"]["rounding"]["damp"] == 0.01


def test_gptq_export_checks_and_verifies(tmp_path, gptq_out, ultra_ckpt):
    """`builder check` accepts both exports; `builder verify` runs each (executor on the
    TensorRT-LLM ranks at tp 2, hf runtime on the HF checkpoint) against a golden."""
    from builder.check import check_artifact
    from builder.cli.app import main

    assert check_artifact(gptq_out).ok
    runner = CliRunner()
    golden = tmp_path / "golden"
    args = ["reference", str(ultra_ckpt), str(golden), "--prompts", "wiki", "--windows", "2"]
    args += ["--seq-len", "24", "--continuation", "2"]
    assert runner.invoke(main, args).exit_code == 0
    from builder.verify.auto import verify_choice

    results = verify_choice(gptq_out, golden)["results"]
    assert set(results) == {"executor", "hf"}
    assert {r["verdict"] for r in results.values()} <= {"pass", "fail"}
    # (the two runtimes compute differently, so their KLs are not compared: that both
    # exports hold one set of codes is test_both_exports_carry_the_same_codes_and_scales)
    assert all(0 < r["metrics"]["kl_mean"] < float("inf") for r in results.values())


def test_auto_recipe_under_gptq_measures_the_stored_codes(tmp_path, ultra_ckpt):
    """--recipe auto --rounding gptq: both formats are rounded during calibration, the
    sensitivity runs those codes (so it differs from nearest's), the choice is exported
    with them and the manifest says so."""
    auto = {"max_kl": 0.05, "max_bf16_fraction": 0.25, "windows": 2}
    from builder.quantize.formats import AutoOptions
    from builder.verify.auto import auto_recipe

    records = {}
    for rounding in ("nearest", "gptq"):
        out = tmp_path / rounding
        summary = quantize_checkpoint(
            ultra_ckpt,
            out,
            auto=AutoOptions(**auto),
            rounding=rounding,
            recipe_search=auto_recipe,
            formats=("hf",),
            **CALIB,
        )
        records[rounding] = summary.auto
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["quantization"]["auto"]["options"]["rounding"] == rounding
        assert manifest["quantization"]["rounding"]["method"] == rounding
    kl = {r: rec["sensitivity"]["kl"] for r, rec in records.items()}
    assert kl["nearest"].keys() == kl["gptq"].keys()
    assert kl["nearest"] != kl["gptq"]


def test_resume_reuses_the_stored_codes(tmp_path, ultra_ckpt, gptq_out):
    """An interrupted run resumes from the saved blocks (their GPTQ codes are not computed
    again) and writes the same bytes as the uninterrupted one; a lost codes file of a saved
    block is an error naming it, not a silent restart."""
    from builder.errors import UserError

    class Stop(Exception):
        pass

    def stop_after(n):
        def progress(done, total, layer):
            if done == n:
                raise Stop

        return progress

    out = tmp_path / "out"
    args = dict(tp=2, recipe=MIXED, rounding="gptq", **CALIB)
    with pytest.raises(Stop):
        quantize_checkpoint(ultra_ckpt, out, block_progress=stop_after(5), **args)
    rounding = tmp_path / ".out.calib" / "rounding"
    saved = sorted(rounding.glob("*.safetensors"))
    assert saved and not out.exists()
    summary = quantize_checkpoint(ultra_ckpt, out, resume=True, **args)
    assert summary.blocks["blocks_resumed"] == 5
    for sub in ("trtllm/rank0.safetensors", "trtllm/rank1.safetensors", "hf/model.safetensors"):
        assert (out / sub).read_bytes() == (gptq_out / sub).read_bytes(), sub
    # the state is gone after success; interrupt again and lose one block's codes
    with pytest.raises(Stop):
        quantize_checkpoint(ultra_ckpt, tmp_path / "again", block_progress=stop_after(5), **args)
    state = tmp_path / ".again.calib" / "rounding"
    lost = sorted(state.glob("*.safetensors"))[0]
    lost.unlink()
    with pytest.raises(UserError, match=lost.name):
        quantize_checkpoint(ultra_ckpt, tmp_path / "again", resume=True, **args)


def test_cli_refuses_an_unknown_rounding(tmp_path, mixed_ckpt):
    from builder.cli.app import main

    out = tmp_path / "o"
    result = CliRunner().invoke(
        main, ["quantize", str(mixed_ckpt), str(out), "--rounding", "bogus"]
    )
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == ["error: --rounding 'bogus': choose nearest or gptq"], result.output
    assert not out.exists()

"""The Triton skinny GEMM (builder/runtime/gemv.py) on a GPU, with and without programmatic
dependent launch, against exact arithmetic."""

from __future__ import annotations

import pytest
import torch

from builder.runtime import gemv

CUDA = torch.cuda.is_available() and gemv.available()
pytestmark = pytest.mark.skipif(
    not CUDA, reason="needs a CUDA GPU with Triton; scripts/bench_gpu.py runs them on the H200"
)
E4M3_STEP = 2.0**-4  # relative spacing of e4m3 values: the FP8 formats' own rounding
BF16_UNIT = 2.0**-8  # unit roundoff of the bf16 output, which every path rounds to once
FP32_UNIT = 2.0**-24


def bound(dtype: torch.dtype, k: int) -> float:
    """Relative (norm) distance from the exact product: the output's bf16 rounding plus the
    accumulation's. bf16 tensor-core products are exact in fp32 and summed in fp32 (at most
    K fp32 roundings); Hopper's FP8 accumulation is narrower than fp32, so it is held to
    1/64 of one e4m3 step: far below the rounding FP8 itself makes."""
    return BF16_UNIT + (E4M3_STEP / 64 if dtype == torch.float8_e4m3fn else k * FP32_UNIT)


SHAPES = [(1, 2304, 16384), (8, 2304, 16384), (1, 16384, 2688), (16, 48, 100), (3, 40, 4672)]


def operands(rows, n, k, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(rows, k, device="cuda", generator=gen)
    w = torch.randn(n, k, device="cuda", generator=gen) / k**0.5
    if dtype == torch.float8_e4m3fn:
        x, w = (x * 16).clamp(-448, 448).to(dtype), (w * 64).clamp(-448, 448).to(dtype)
    else:
        x, w = x.to(dtype), w.to(dtype)
    return x, w, torch.tensor(0.25, device="cuda")


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_skinny_gemm_computes_the_product_with_and_without_pdl(shape, dtype):
    rows, n, k = shape
    x, w, scale = operands(rows, n, k, dtype)
    exact = (x.double() @ w.double().T) * scale.double()
    plain = gemv.skinny_gemm(x, w, scale, torch.bfloat16)
    assert ((plain.double() - exact).norm() / exact.norm()).item() <= bound(dtype, k)
    # the same tiles in the same order: PDL changes when the kernel starts, not its sums
    assert torch.equal(gemv.skinny_gemm(x, w, scale, torch.bfloat16, pdl=True), plain)


def test_fp8_products_accumulate_in_fp32_over_long_k():
    """In fp32 output (no bf16 rounding to hide behind), over Ultra's longest K (the fused
    FFN's down projection at TP8): held to 1/64 of one e4m3 step, what the product needs (FP8's
    own rounding is 64x larger). This kernel's mma.sync on f16-converted operands (e4m3 is
    exact in f16) accumulates in fp32: random-signed terms err by about sqrt(K) 2^-24 = 1e-5,
    about 100x inside. Hopper's FP8 wgmma sums in a narrower accumulator unless promoted: 5e-3
    was measured here for such a path, 5x outside."""
    x, w, scale = operands(1, 512, 37632, torch.float8_e4m3fn)
    exact = (x.double() @ w.double().T) * scale.double()
    got = gemv.skinny_gemm(x, w, scale, torch.float32)
    assert ((got.double() - exact).norm() / exact.norm()).item() <= E4M3_STEP / 64


WIDE = [(33, 2304, 16384), (64, 1344, 4672)]  # W8A16's batched decode: 32 and 64 rows


@pytest.mark.parametrize("shape", SHAPES + WIDE, ids=lambda s: "x".join(map(str, s)))
def test_skinny_gemm_with_int8_codes_and_channel_scales(shape):
    """W8A16: int8 codes are exact in bf16, so the product is a bf16 tensor-core product
    summed in fp32, each output feature then times its own scale: the bf16 bound."""
    rows, n, k = shape
    x, w, _ = operands(rows, n, k, torch.bfloat16)
    codes = (w.float() * 127 / w.float().abs().amax(1, keepdim=True)).round().to(torch.int8)
    scale = torch.rand(n, device="cuda") + 0.5
    exact = (x.double() @ codes.double().T) * scale.double()
    got = gemv.skinny_gemm(x, codes, scale, torch.bfloat16)
    assert ((got.double() - exact).norm() / exact.norm()).item() <= bound(torch.bfloat16, k)
    assert torch.equal(gemv.skinny_gemm(x, codes, scale, torch.bfloat16, pdl=True), got)


def every_config(wide: bool):
    return gemv.WIDE_CONFIGS if wide else gemv.SKINNY_CONFIGS


@pytest.mark.parametrize("wide", [False, True], ids=["16 rows", "32-64 rows"])
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.bfloat16, torch.int8])
def test_every_autotuner_config_computes_the_product(dtype, wide):
    """Each configuration the autotuner may pick, launched directly: ragged N and K (masked
    tiles), the longest K of Ultra at TP8, fp32 output, against exact arithmetic. bf16 (and
    int8 codes, exact in bf16) products are exact in fp32, so at most K fp32 roundings of the
    sum: K 2^-24 relative, the worst case. FP8: 1/64 of an e4m3 step, as the test above."""
    import triton
    from triton.runtime.errors import OutOfResources

    if wide and dtype != torch.int8:
        pytest.skip("more than 16 rows: W8A16 only")
    rows, n, k = (40, 200, 37632) if wide else (3, 200, 37632)
    x, w, scale = operands(rows, n, k, torch.bfloat16 if dtype == torch.int8 else dtype)
    if dtype == torch.int8:
        w = (w.float() * 127 / w.float().abs().amax()).round().to(dtype)
        scale = torch.rand(n, device="cuda") + 0.5
    exact = (x.double() @ w.double().T) * scale.double()
    limit = E4M3_STEP / 64 if dtype == torch.float8_e4m3fn else k * FP32_UNIT
    kernel = gemv._kernel(wide).fn
    ran = 0
    for block_n, block_k, warps, stages in every_config(wide):
        y = torch.empty(rows, n, dtype=torch.float32, device="cuda")
        try:
            kernel[(triton.cdiv(n, block_n),)](
                x, w, scale, y, rows, n, k,
                BLOCK_N=block_n, BLOCK_K=block_k, GDC=False, CHANNEL=dtype == torch.int8,
                BLOCK_M=max(16, triton.next_power_of_2(rows)),
                num_warps=warps, num_stages=stages,
            )  # fmt: skip
        except OutOfResources:  # the autotuner skips these too
            continue
        error = ((y.double() - exact).norm() / exact.norm()).item()
        assert error <= limit, (block_n, block_k, warps, stages, error)
        ran += 1
    assert ran >= len(every_config(wide)) // 2


def test_skinny_gemm_refuses_more_rows_than_its_tile():
    x, w, scale = operands(17, 64, 64, torch.bfloat16)
    with pytest.raises(ValueError, match="17 rows, at most 16"):
        gemv.skinny_gemm(x, w, scale, torch.bfloat16)


def test_chooser_never_runs_a_path_whose_result_differs():
    x, w, scale = operands(1, 2304, 16384, torch.float8_e4m3fn)
    good = lambda: gemv.skinny_gemm(x, w, scale, torch.bfloat16)  # noqa: E731
    chooser = gemv.Chooser()
    key = (1, 2304, 16384, torch.float8_e4m3fn, torch.bfloat16)
    out = chooser.run(key, {"cublas": good, "wrong": lambda: good() * 2})
    assert chooser.choices[key] == "cublas" and chooser.rejected[key] == ["wrong"]
    assert torch.equal(out, good())
    assert chooser.summary()[0]["rejected"] == ["wrong"]


def test_chooser_overrides_and_records_what_ran():
    x, w, scale = operands(1, 2304, 16384, torch.float8_e4m3fn)
    paths = gemv.candidates(
        lambda: torch._scaled_mm(
            x, w.t(), scale_a=scale, scale_b=torch.ones((), device="cuda"), out_dtype=torch.bfloat16
        ),
        x,
        w,
        scale,
        torch.bfloat16,
        pdl=False,
    )
    chooser = gemv.Chooser()
    key = (1, 2304, 16384, torch.float8_e4m3fn, torch.bfloat16)
    with chooser.recording() as seen:
        chooser.run(key, paths)
    assert seen == {key} and set(chooser.times_us[key]) == {"cublas", "triton"}
    for name in ("cublas", "triton"):
        chooser.overrides[key] = name
        assert chooser.choice(key) == name
        assert torch.equal(chooser.run(key, paths), paths[name]())
    assert chooser.summary()[0]["chosen_in_the_step"] is True

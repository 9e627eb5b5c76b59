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


GATED_SHAPES = [(1, 16384, 2688), (8, 16384, 4672), (3, 40, 100), (16, 64, 1000)]


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.bfloat16])
@pytest.mark.parametrize("shape", GATED_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gated_gemm_multiplies_the_silu_kernels_output(shape, dtype):
    """The down projection computing silu(gate) * up itself reads the very input the SiLU
    kernel writes (the same roundings, in e4m3 by the same a_scale), so both paths are held
    to the same bound from the exact product of that kernel's output."""
    from builder.runtime import fused

    rows, n, k = shape
    gen = torch.Generator(device="cuda").manual_seed(1)
    gate_up = (2 * torch.randn(rows, 2 * k, device="cuda", generator=gen)).to(torch.bfloat16)
    _, w, scale = operands(rows, n, k, dtype)
    a_scale = torch.tensor(0.02, device="cuda") if dtype == torch.float8_e4m3fn else None
    inner = fused.silu_mul(gate_up, k, a_scale)
    exact = (inner.double() @ w.double().T) * scale.double()
    for path in (
        gemv.gated_gemm(gate_up, w, scale, a_scale, torch.bfloat16),
        gemv.gated_gemm(gate_up, w, scale, a_scale, torch.bfloat16, pdl=True),
        gemv.skinny_gemm(inner, w, scale, torch.bfloat16),
    ):
        assert ((path.double() - exact).norm() / exact.norm()).item() <= bound(dtype, k)


def test_gated_candidates_are_one_product():
    from builder.runtime import fused

    gen = torch.Generator(device="cuda").manual_seed(2)
    gate_up = torch.randn(1, 2 * 2688, device="cuda", generator=gen).to(torch.bfloat16)
    _, w, scale = operands(1, 16384, 2688, torch.float8_e4m3fn)
    a_scale = torch.tensor(0.01, device="cuda")
    one = torch.ones((), device="cuda")
    paths = gemv.gated_candidates(
        lambda x: torch._scaled_mm(x, w.t(), scale_a=scale, scale_b=one, out_dtype=torch.bfloat16),
        lambda: fused.silu_mul(gate_up, 2688, a_scale),
        gate_up,
        w,
        scale,
        a_scale,
        torch.bfloat16,
        pdl=False,
    )
    chooser = gemv.Chooser()
    key = (1, 16384, 2688, torch.float8_e4m3fn, torch.bfloat16, gemv.GATED)
    chooser.run(key, paths)
    assert set(chooser.times_us[key]) == {"cublas", "triton", "gated"}, chooser.rejected
    assert chooser.summary()[0]["input"] == gemv.GATED

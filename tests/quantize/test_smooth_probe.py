"""scripts/smooth_gptq_probe.py measures what it says: the smoothing fold is an identity of the
block in fp32 (GQA's shared v channels included), and GPTQ's weights lie on the format's E4M3
grid at the format's scales and lower the layer error GPTQ minimizes."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from builder.arch.plan import AttentionKind, FfnKind
from builder.quantize.blockwise import load_block
from builder.quantize.formats import channel_scales, quantize_channels
from builder.synth import SynthSpec, write_synthetic

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "smooth_gptq_probe.py"


@pytest.fixture(scope="module")
def probe():
    spec = importlib.util.spec_from_file_location("smooth_gptq_probe", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their annotations there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_synthetic(
        tmp_path_factory.mktemp("smooth") / "mixed", SynthSpec(preset="mixed", hidden=64, heads=4)
    )


def full_blocks(plan):
    return [
        lay
        for lay in plan.layers
        if lay.attention is AttentionKind.ATTENTION and lay.ffn is FfnKind.MLP
    ]


@pytest.mark.parametrize("transform", ["smooth=0.5", "smooth=0.9", "placebo=1"])
def test_fold_is_an_identity_in_fp32(probe, ckpt, transform):
    """Each folded weight is the old one times or over s, rounded once in fp32 (relative error
    at most 2^-24); a linear's output then moves by at most 2^-24 sum_j |x_j w_j| per element,
    and the norm, rope, softmax and SiLU of the block amplify that by a modest constant: 1e-5
    of the output's scale is ~80 ulps of room, while a wrong fold (a scale on the wrong GQA
    channel, a missing 1/s) moves the output by O(1)."""
    from builder.verify.sensitivity import _run
    from builder.verify.stream import BlockStream

    stream = BlockStream(ckpt, dtype=torch.float32, keep_blocks=False)
    blocks = full_blocks(stream.plan)
    assert any(stream.plan.num_attention_heads // lay.kv_heads > 1 for lay in blocks)
    spec = probe.StreamSpec.parse(f"bf16:{transform}")
    gen = torch.Generator().manual_seed(0)
    for layer in blocks:
        hidden = torch.randn(2, 32, stream.plan.hidden_size, generator=gen)
        hidden[..., 3] *= 20  # an outlier channel, what smoothing is for
        block = load_block(stream.parts, stream.ckpt, layer.index, "cpu", torch.float32)
        before, stats = probe.observe(stream, block, hidden, hessians=False)
        folded = load_block(stream.parts, stream.ckpt, layer.index, "cpu", torch.float32)
        scales = probe.fold(folded, stats, spec)
        assert any(not torch.equal(s, torch.ones_like(s)) for s in scales.values())
        after = _run(stream, folded, hidden, 4)
        scale = (before - hidden).abs().max()
        assert (after - before).abs().max() <= 1e-5 * scale, (layer.index, transform)
        # and the statistics the fold implies are those of the folded block's inputs
        _, folded_stats = probe.observe(stream, folded, hidden, hessians=False)
        for name, xmax in stats.xmax.items():
            torch.testing.assert_close(folded_stats.xmax[name], xmax / scales[name])


def test_gptq_stays_on_the_grid_and_lowers_the_layer_error(probe):
    gen = torch.Generator().manual_seed(1)
    mix = torch.randn(128, 128, generator=gen) * 0.3 + torch.eye(128)
    x = (torch.randn(2048, 128, generator=gen) @ mix) * torch.rand(128, generator=gen) * 3
    w = torch.randn(64, 128, generator=gen)
    scales = channel_scales(w)
    nearest = quantize_channels(w, scales).float() * scales[:, None]

    def error(q):
        return float(((x @ (w - q).T) ** 2).mean())

    for act_order in (False, True):
        probe.ACT_ORDER = act_order
        q = probe.gptq(w, x.T @ x, scales)
        on_grid = quantize_channels(q, scales).float() * scales[:, None]
        assert torch.equal(on_grid, q)
        # GPTQ's optimal-brain-surgeon updates minimize this very error; nearest rounding
        # ignores the correlations, so with correlated inputs it loses clearly
        assert error(q) < 0.8 * error(nearest)
    probe.ACT_ORDER = False


def test_int8_w8a8_rounds_each_token_to_its_own_int8_grid(probe):
    """int8sq's activation: each row on the INT8 grid of its own amax / 127, so the product is
    the dequantized weight times that row. Bounds, fp32 (unit u = 2^-24): a grid point is at
    most half a step from the input, plus the division's and the multiply's roundings at up to
    127 steps (2 x 127 u steps); the product and the same sum in another order are each
    within the dot's worst case, K u sum |x_j w_j| (K = 64), so within twice that apart."""
    u = 2.0**-24
    torch.manual_seed(0)
    x = torch.randn(5, 64) * torch.tensor([1.0, 10.0, 0.1, 1000.0, 3.0])[:, None]
    w = torch.randn(8, 64)
    linear = probe.Int8TokenLinear(w)
    step = x.abs().amax(dim=1, keepdim=True) / probe.INT8_MAX
    xq = torch.round(x / step).clamp(-probe.INT8_MAX, probe.INT8_MAX) * step
    assert ((xq - x).abs() <= step * (0.5 + 2 * probe.INT8_MAX * u)).all()
    got, expected = linear(x), xq @ w.T
    assert ((got - expected).abs() <= 2 * 64 * u * (xq.abs() @ w.abs().T)).all()


def test_stream_specs_of_the_floor_and_the_w8a8_probe(probe, tmp_path):
    spec = probe.StreamSpec.parse("int8sq:smooth=0.5+gptq+bf16of=r.json")
    assert (spec.fmt, spec.alpha, spec.gptq, spec.bf16_of) == ("int8sq", 0.5, True, "r.json")
    assert spec.name == "int8sq:smooth=0.5+gptq+bf16of=r.json"
    assert probe.StreamSpec.parse("fp8-pc-pt:exactw").exact_weights
    for bad in ("fp8:exactw+gptq", "int8sq:recipe=a.json+bf16of=b.json"):
        with pytest.raises(SystemExit):
            probe.StreamSpec.parse(bad)
    recipe = tmp_path / "r.json"  # bf16of keeps the BF16-compute units (BF16, W8A16) only
    recipe.write_text('{"default": "fp8", "overrides": {"0.qkv": "bf16", "0.o": "w8a16"}}')
    spec = probe.StreamSpec.parse(f"fp8-block:bf16of={recipe}")
    formats = [probe.linear_format(spec, 0, n) for n in ("self_attn.q_proj", "self_attn.o_proj")]
    assert formats == ["bf16", "bf16"]
    assert probe.linear_format(spec, 0, "mlp.down_proj") == "fp8-block"


def test_fp8_block_scales_are_per_block_and_gptq_at_them_is_nearest_under_identity_h(probe):
    """fp8-block: a huge value coarsens only its own 128 x 128 block; GPTQ with H = I (no
    correlation to exploit) gives the nearest E4M3 codes at the same per-element scales."""
    torch.manual_seed(0)
    w = torch.randn(256, 384)
    spiky = w.clone()
    spiky[0, 0] = 1e4
    a, b = probe.e4m3_blocks(w, 128, 128), probe.e4m3_blocks(spiky, 128, 128)
    assert torch.equal(a[128:], b[128:]) and torch.equal(a[:, 128:], b[:, 128:])
    assert not torch.equal(a[:128, :128], b[:128, :128])
    assert torch.equal(probe.block_scales(spiky)[5, 5], probe.block_scales(spiky)[127, 127])
    nearest = probe.e4m3_blocks(w, 128, 128)  # diagonal H: no update, the same bits
    assert torch.equal(
        probe.gptq_elementwise_scales(w, torch.eye(384), probe.block_scales(w)), nearest
    )

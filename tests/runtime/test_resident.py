"""ResidentRuntime against the reference executor on the same checkpoints (tolerances derived in
builder/runtime/resident.py's docstring)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from builder.arch.plan import AttentionKind
from builder.convert import convert_checkpoint
from builder.errors import UserError
from builder.quantize.amax import K_BMM, V_BMM, AmaxTable
from builder.quantize.export_trtllm import write_trtllm_fp8
from builder.runtime import TrtllmCheckpointExecutor, compare_logits
from builder.runtime.resident import ResidentRuntime, linears_of

FP32_TOLERANCE = 1e-5  # relative: max |a - b| / max |b|
CUDA = torch.cuda.is_available()
NEEDS_CUDA = pytest.mark.skipif(
    not CUDA,
    reason="needs a CUDA GPU (CUDA graphs, compiled kernels); "
    "scripts/bench_gpu.py runs these checks on the H200",
)
# HF modules behind each TensorRT-LLM linear (q/k/v and fc/gate share their group's scales)
HF_MODULES = {
    "attention.qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attention.dense": ("self_attn.o_proj",),
    "attention": ("self_attn.linear_attn",),
    "ffn.fc": ("mlp.gate_proj",),
    "ffn.gate": ("mlp.up_proj",),
    "ffn.proj": ("mlp.down_proj",),
    "ffn": ("mlp.linear_mlp",),
}


def token_ids(seq: int = 12, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 1000, (batch, seq), generator=torch.Generator().manual_seed(seed))


def calibrated_table(trt_dir, ids) -> AmaxTable:
    """A real (small) calibration: input amax recorded by the executor running the BF16
    checkpoint, weight amax from the weights; k/v amax from the qkv outputs."""
    values: dict[str, float] = {}

    def record(call):
        x = call.x
        out = F.linear(x, call.tensor("weight").to(x.dtype))
        if call.name == "lm_head":
            return out
        _, _, layer, module = call.name.split(".", 3)
        for hf in HF_MODULES[module]:
            key = f"model.layers.{layer}.{hf}"
            values[f"{key}.input_quantizer"] = max(
                values.get(f"{key}.input_quantizer", 0.0), x.abs().max().item()
            )
            values[f"{key}.weight_quantizer"] = call.tensor("weight").abs().max().item()
        if module == "attention.qkv":
            amax = out.abs().max().item()
            for kind in (K_BMM, V_BMM):
                values[f"model.layers.{layer}.self_attn.{kind}"] = amax
        return out

    with TrtllmCheckpointExecutor(trt_dir, dtype=torch.bfloat16, linear_hook=record) as executor:
        executor(ids)
    return AmaxTable(values, kv_cache=True)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, mixed_ckpt):
    """The mixed preset (every block kind, KV heads 1-8) converted at tp 1 and 2, and FP8 at tp
    1."""
    root = tmp_path_factory.mktemp("resident")
    for tp in (1, 2):
        convert_checkpoint(mixed_ckpt, root / f"bf16-tp{tp}", tp)
    table = calibrated_table(root / "bf16-tp1", token_ids(seed=1))
    write_trtllm_fp8(mixed_ckpt, root / "fp8-tp1", table, tp=1)
    return root


def executor_logits(directory, ids, dtype) -> torch.Tensor:
    with TrtllmCheckpointExecutor(directory, dtype=dtype) as executor:
        return executor(ids)


def runtime(directory, dtype, **kwargs) -> ResidentRuntime:
    return ResidentRuntime.from_checkpoint(directory, dtype=dtype, max_seq=64, **kwargs)


@pytest.fixture(scope="module")
def bf16_noise(checkpoints):
    """How far bf16 execution is from fp32 on these inputs: the unit of the bf16 bounds."""
    ids = token_ids()
    noise = compare_logits(
        executor_logits(checkpoints / "bf16-tp1", ids, torch.bfloat16),
        executor_logits(checkpoints / "bf16-tp1", ids, torch.float32),
    ).relative_error
    assert 0.002 < noise < 0.05
    return noise


@pytest.mark.parametrize("tp", [1, 2])
def test_prefill_matches_executor(checkpoints, bf16_noise, tp):
    """fp32: the executor's operations in its order, so fp32 rounding only. bf16: within 2x the
    bf16 noise of the executor (each is within that noise of fp32; see the module docstring)."""
    ids = token_ids()
    directory = checkpoints / f"bf16-tp{tp}"
    for dtype, tolerance in ((torch.float32, FP32_TOLERANCE), (torch.bfloat16, 2 * bf16_noise)):
        result = compare_logits(
            runtime(directory, dtype).prefill(ids), executor_logits(directory, ids, dtype)
        )
        assert result.relative_error <= tolerance, (dtype, result)


def test_decode_steps_match_executor_full_forward(checkpoints, bf16_noise):
    """Greedy decode from the cache gives the executor's tokens (fp32: its re-forward of the
    whole sequence each step) and, teacher-forced on them, bf16 logits within 2x bf16 noise."""
    directory, ids, steps = checkpoints / "bf16-tp1", token_ids(), 6
    tokens = runtime(directory, torch.float32).generate(ids, steps)
    sequence = ids
    with TrtllmCheckpointExecutor(directory, dtype=torch.float32) as executor:
        for _ in range(steps):
            sequence = torch.cat(
                [sequence, executor(sequence)[:, -1].argmax(-1, keepdim=True)], dim=1
            )
    assert torch.equal(tokens, sequence[:, ids.shape[1] :])
    bf16 = runtime(directory, torch.bfloat16)
    bf16.prefill(ids)
    for i in range(steps - 1):
        logits = bf16.decode(sequence[:, ids.shape[1] + i])
        expected = executor_logits(directory, sequence[:, : ids.shape[1] + i + 1], torch.bfloat16)[
            :, -1
        ]
        assert compare_logits(logits, expected).relative_error <= 2 * bf16_noise, i


def test_fp8_paths_match_the_emulation(checkpoints):
    """FP8 checkpoint (FP8 linears and KV cache). Each GEMM: _scaled_mm and the emulation on the
    same e4m3 input differ by fp32 summation order only (<= K * 2^-24 relative, K <= 10^4).
    End to end those differences flip some later e4m3 roundings, and flips cascade through the
    layers, so two FP8 executions of one model may differ by up to the FP8 quantization error
    itself (FP8 vs BF16 weights) - but not more (greedy tokens of an FP8 model are checked
    through the same decode path as BF16's, in test_decode_steps_match_executor_full_forward)."""
    ids, directory = token_ids(), checkpoints / "fp8-tp1"
    reference = executor_logits(directory, ids, torch.float32)
    quantization_error = compare_logits(
        reference, executor_logits(checkpoints / "bf16-tp1", ids, torch.float32)
    )
    assert 0.005 < quantization_error.relative_error < 0.5
    fast = runtime(directory, torch.float32, fp8_gemm="scaled-mm")
    linears = fast.fp8_linears()
    per_kind = {"attention": 2, "mlp": 2, "linear": 1, "no_op": 0}  # qkv+dense, fc|gate+proj
    assert len(linears) == sum(
        per_kind[lay.attention.value] + per_kind[lay.ffn.value] for lay in fast.plan.layers
    )
    gen = torch.Generator().manual_seed(3)
    for name, linear in linears:
        xq = (
            (torch.randn(5, 3, linear.weight_t.shape[0], generator=gen) * 100)
            .clamp(-448, 448)
            .to(torch.float8_e4m3fn)
        )
        a, b = linear(xq), linear.with_gemm("emulate", torch.float32)(xq)
        assert compare_logits(a, b).relative_error <= 1e-5, name
    emulated = runtime(directory, torch.float32, fp8_gemm="emulate").prefill(ids)
    for logits in (emulated, fast.prefill(ids)):
        assert compare_logits(logits, reference).relative_error <= quantization_error.relative_error
    # bf16 activations through FP8 GEMMs: bf16 execution noise on top of the FP8 bound
    fp8_bf16_noise = compare_logits(
        executor_logits(directory, ids, torch.bfloat16), reference
    ).relative_error
    for gemm in ("emulate", "scaled-mm"):
        bf16 = runtime(directory, torch.bfloat16, fp8_gemm=gemm).prefill(ids)
        bound = fp8_bf16_noise + quantization_error.relative_error
        assert compare_logits(bf16, reference).relative_error <= bound, gemm


@pytest.fixture(scope="module")
def every_format_ckpt(tmp_path_factory, mixed_ckpt):
    """The mixed preset quantized with each linear kind in each format (FP8 per-tensor, FP8
    per-channel-per-token, BF16) somewhere: a MIXED_PRECISION TensorRT-LLM checkpoint."""
    from builder.arch import load_plan
    from builder.quantize.formats import LinearFormat, Recipe, model_units
    from builder.quantize.pipeline import quantize_checkpoint

    cycle = (LinearFormat.FP8, LinearFormat.FP8_PC_PT, LinearFormat.BF16)
    units = model_units(load_plan(mixed_ckpt))
    recipe = Recipe(LinearFormat.FP8, {u.key: cycle[i % 3] for i, u in enumerate(units)})
    out = tmp_path_factory.mktemp("every-format") / "q"
    quantize_checkpoint(mixed_ckpt, out, calib_size=4, calib_seq_len=16, recipe=recipe)
    return out / "trtllm"


@pytest.mark.parametrize(
    "gemm", ["emulate", pytest.param("scaled-mm", marks=NEEDS_CUDA)], ids=["emulate", "cuda"]
)
def test_every_linear_format_runs_like_the_executor(checkpoints, every_format_ckpt, gemm):
    """Per-tensor and per-channel FP8 and BF16 linears in one checkpoint: the runtime binds
    each to its format's GEMM (the per-channel ones quantize their input per token) and its
    logits stay within what FP8 itself costs (the bound of test_fp8_paths_match_the_emulation:
    a flipped e4m3 rounding cascades through the layers, up to the quantization error)."""
    from builder.runtime.resident import DenseLinear, Fp8Linear, RowwiseFp8Linear

    ids = token_ids()
    reference = executor_logits(every_format_ckpt, ids, torch.float32)
    quantization_error = compare_logits(
        reference, executor_logits(checkpoints / "bf16-tp1", ids, torch.float32)
    ).relative_error
    device = "cuda" if gemm == "scaled-mm" else "cpu"
    rt = runtime(every_format_ckpt, torch.float32, fp8_gemm=gemm, device=device)
    kinds = {type(lin) for p in rt.parts for w in p.ranks for lin in linears_of(w)}
    assert kinds == {DenseLinear, Fp8Linear, RowwiseFp8Linear}
    logits = rt.prefill(ids.to(device)).cpu()
    assert compare_logits(logits, reference).relative_error <= quantization_error
    # decode from the cache gives the executor's greedy tokens on this checkpoint too
    tokens = rt.generate(ids.to(device), 3).cpu()
    sequence = ids
    with TrtllmCheckpointExecutor(every_format_ckpt, dtype=torch.float32) as executor:
        for _ in range(3):
            step = executor(sequence)[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, step], dim=1)
    if gemm == "emulate":  # the same roundings in the same order: the same tokens
        assert torch.equal(tokens, sequence[:, ids.shape[1] :])


def test_plan_decides_parts_and_caches(checkpoints):
    """No-op halves build nothing; each GQA layer's cache has that layer's KV heads (ceil at tp
    2)."""
    rt = runtime(checkpoints / "bf16-tp2", torch.bfloat16)
    plan = rt.plan
    halves = sum(
        (lay.attention is not AttentionKind.NO_OP) + (lay.ffn.value != "no_op")
        for lay in plan.layers
    )
    assert len(rt.parts) == halves
    heads = [c.kv_heads for c in rt.caches]
    assert heads == [h for lay in plan.attention_layers for h in [-(-lay.kv_heads // 2)] * 2]
    assert all(c.k_cache.shape == (8, c.kv_heads, 64, plan.head_dim) for c in rt.caches)
    rank_bytes = sum(p.stat().st_size for p in (checkpoints / "bf16-tp2").glob("rank*.safetensors"))
    assert 0.95 * rank_bytes < rt.weight_bytes <= rank_bytes  # every tensor once (headers aside)


def test_single_rank_holds_only_its_share(tmp_path, ultra_ckpt):
    """rank=r: one GPU's share (its heads, its FFN slice, its vocab shard), collectives left out."""
    convert_checkpoint(ultra_ckpt, tmp_path / "tp2", 2)
    one = ResidentRuntime.from_checkpoint(tmp_path / "tp2", rank=1, max_seq=32)
    assert one.weight_bytes <= (tmp_path / "tp2" / "rank1.safetensors").stat().st_size
    logits = one.generate(token_ids(seq=5, batch=1), 3)
    assert logits.shape == (1, 3)
    assert one.prefill(token_ids(seq=5, batch=1)).shape[-1] == one.plan.vocab_size // 2


def test_bad_requests_name_the_problem(checkpoints):
    with pytest.raises(UserError, match="linear-replacement block needs its all-gather"):
        runtime(checkpoints / "bf16-tp2", torch.bfloat16, rank=0)
    rt = runtime(checkpoints / "bf16-tp1", torch.bfloat16)
    with pytest.raises(UserError, match="prefill none first"):
        rt.decode(torch.tensor([1, 2]))
    with pytest.raises(UserError, match="the cache holds 8 x 63"):
        rt.prefill(token_ids(seq=64))

    tensors = load_file(checkpoints / "bf16-tp1" / "rank0.safetensors")
    del tensors["transformer.layers.0.ffn.proj.weight"]
    with pytest.raises(
        UserError, match=r"rank0.safetensors: tensor 'transformer.layers.0.ffn.proj.weight' missing"
    ):
        ResidentRuntime.from_tensors(rt.config, [tensors])


@NEEDS_CUDA
def test_cuda_graph_decode_matches_eager_and_cpu_emulation(checkpoints):
    """On a GPU: graph replays give the eager step's logits; FP8 on tensor cores agrees with
    the CPU emulation within the FP8 bound."""
    ids, directory = token_ids(), checkpoints / "fp8-tp1"
    graphed = runtime(directory, torch.bfloat16, device="cuda")
    eager = runtime(directory, torch.bfloat16, device="cuda", graphs=False)
    token = graphed.prefill(ids)[:, -1].argmax(-1)
    eager.prefill(ids)
    for _ in range(4):
        a, b = graphed.decode(token), eager.decode(token)
        assert compare_logits(a, b).relative_error <= 1e-2
        token = b.argmax(-1)
    reference = executor_logits(directory, ids, torch.float32)
    quantization_error = compare_logits(
        reference, executor_logits(checkpoints / "bf16-tp1", ids, torch.float32)
    )
    gpu = runtime(directory, torch.float32, device="cuda")
    assert (
        compare_logits(gpu.prefill(ids).cpu(), reference).relative_error
        <= quantization_error.relative_error
    )
    for name, linear in gpu.fp8_linears():  # each GEMM on the GPU vs the emulation on the CPU
        xq = (
            (torch.randn(17, linear.weight_t.shape[0]) * 100)
            .clamp(-448, 448)
            .to(torch.float8_e4m3fn)
        )
        cpu = linear.with_gemm("emulate", torch.float32)
        cpu.weight_t, cpu.scale = cpu.weight_t.cpu(), cpu.scale.cpu()
        # FP8 tensor cores (cuBLAS at 17 rows, cuBLAS or Triton at 1): their accumulation is not
        # full fp32 (1.3e-4 measured on an H200), still ~100x below one e4m3 rounding (2^-4)
        for rows in (xq, xq[:1]):
            assert compare_logits(linear(rows.cuda()).cpu(), cpu(rows)).relative_error <= 1e-3, name


@NEEDS_CUDA
def test_tuning_decode_linears_leaves_the_cache_and_position_as_they_were(checkpoints):
    """tune_decode_linears replays the step to time it; afterwards, with the paths that ran
    before, the next step gives bit for bit the logits it gave before tuning. (With a path
    changed the sums' order changes, and in FP8 that can move an activation across an e4m3
    rounding: 2-5% of the logits' range measured on this model, so no tighter bound holds.)"""
    from builder.runtime.gemv import CHOOSER

    ids = token_ids()
    rt = runtime(checkpoints / "fp8-tp1", torch.bfloat16, device="cuda")
    token = rt.prefill(ids)[:, -1].argmax(-1)
    before = rt.decode(token)
    try:
        ran = dict(CHOOSER.choices)
        rt.prefill(ids)
        trials = rt.tune_decode_linears(rounds=1, replays=2)
        assert trials and all(t.kept in t.step_ms and len(t.step_ms) == 2 for t in trials)
        assert {t.key for t in trials} <= set(CHOOSER.overrides)
        assert rt.length == ids.shape[1]  # the position is where the prefill left it
        CHOOSER.overrides.update({t.key: ran[t.key] for t in trials})
        assert torch.equal(rt.decode(token), before)
    finally:
        CHOOSER.overrides.clear()


def test_tuning_decode_linears_needs_graphs_and_a_prefill(checkpoints):
    rt = runtime(checkpoints / "bf16-tp1", torch.float32)
    with pytest.raises(UserError, match="needs CUDA graphs, the Triton kernels and a prefill"):
        rt.tune_decode_linears()


def test_cache_holds_whole_decode_attention_tiles(checkpoints):
    """The fused decode attention takes spans of whole 64-position tiles: any max_seq is
    rounded up to them, and so is every span a step attends over (`builder bench` asks for
    isl + osl, e.g. 160)."""
    from builder.runtime.fused import DECODE_TILE

    rt = ResidentRuntime.from_checkpoint(checkpoints / "bf16-tp1", max_seq=160)
    assert rt.max_seq == 192 and rt.positions.numel() == 192 and rt.cos.shape[0] == 192
    assert {c.k_cache.shape[2] for c in rt.caches} == {192}
    assert all(rt.span_for(length) % DECODE_TILE == 0 for length in range(1, 192))


def test_pdl_rebinds_only_the_triton_kernels_in_use():
    """set_pdl rebinds the Triton kernels with the new launch setting; a kernel switched off (the
    fused decode attention, for the eager comparison) stays off, and without Triton there is
    nothing to launch that way. Binding runs no kernel, so this holds on the CPU."""
    from builder.runtime.resident import Kernels

    kernels = Kernels(compile=False, triton=True)
    kernels.decode_attention = None
    kernels.set_pdl(True)
    assert kernels.pdl and kernels.decode_attention is None
    assert kernels.rope_cache.keywords == kernels.add_norm.keywords == {"pdl": True}
    plain = Kernels(compile=False, triton=False)
    plain.set_pdl(True)
    assert not plain.pdl and plain.rope_cache is None


@NEEDS_CUDA
def test_programmatic_dependent_launch_changes_no_result(checkpoints):
    """PDL changes when kernels start, not what they compute: graph-replayed decode logits with
    and without it are bit-identical (same kernels, same tiles, same summation order), in BF16
    and FP8, and every kernel still sees its producer's output (a missing wait would read the
    previous step's buffers)."""
    from builder.runtime.resident import pdl_supported

    if not pdl_supported(torch.device("cuda")):
        pytest.skip("programmatic dependent launch needs compute capability 9.0")
    ids = token_ids()
    for name in ("bf16-tp1", "fp8-tp1"):
        with_pdl = runtime(checkpoints / name, torch.bfloat16, device="cuda", pdl=True)
        without = runtime(checkpoints / name, torch.bfloat16, device="cuda", pdl=False)
        assert with_pdl.pdl and not without.pdl
        a, b = with_pdl.prefill(ids), without.prefill(ids)
        assert torch.equal(a, b), name
        token = b[:, -1].argmax(-1)
        for _ in range(6):
            a, b = with_pdl.decode(token), without.decode(token)
            assert torch.equal(a, b), name
            token = b.argmax(-1)


@NEEDS_CUDA
def test_fused_triton_chains_round_like_the_executor():
    """The Triton add+norm and SiLU chains make the executor's roundings (bf16 after the add,
    the norm and the weight multiply; e4m3 nearest-even): equal but for elements where the
    fast rsqrt/exp moves a value across a rounding midpoint (rare, one step)."""
    from builder.runtime import fused, resident

    if not fused_available():
        pytest.skip("Triton is not importable")
    x, d = (torch.randn(16, 4096, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    w = (1 + 0.05 * torch.randn(4096, device="cuda")).to(torch.bfloat16)
    scale = torch.tensor(0.02, device="cuda")
    fg = 3 * torch.randn(16, 2 * 1024, device="cuda", dtype=torch.bfloat16)
    for got, expected in [
        (fused.add_norm(x, d, w, 1e-5), resident.add_norm(x, d, w, 1e-5)),
        (fused.add_norm_quant(x, d, w, 1e-5, scale), resident.add_norm_quant(x, d, w, 1e-5, scale)),
        ((fused.silu_mul(fg, 1024),), (resident.silu_mul(fg, 1024),)),
        ((fused.silu_mul_quant(fg, 1024, scale),), (resident.silu_mul_quant(fg, 1024, scale),)),
    ]:
        if len(got) == 2:
            assert torch.equal(got[0], expected[0])  # the residual sum: exact
        a, b = got[-1].float(), expected[-1].float()
        assert (a != b).float().mean() <= 0.01
        assert ((a - b).abs() <= 0.13 * b.abs() + 1e-6).all()  # at most one e4m3 (or bf16) step


@NEEDS_CUDA
def test_fused_rope_writes_the_cache_like_the_eager_path():
    """q rotated and k/v written into the cache at their positions, nowhere else."""
    from builder.runtime import fused, resident
    from builder.runtime.executor import fp8_round_trip

    if not fused_available():
        pytest.skip("Triton is not importable")
    qkv = torch.randn(2, 9, (8 + 2 * 2) * 64, device="cuda", dtype=torch.bfloat16)
    angles = torch.arange(32, device="cuda")[:, None] * torch.rand(32, device="cuda")
    cos, sin = (
        torch.cat([angles, angles], -1).cos().bfloat16(),
        torch.cat([angles, angles], -1).sin().bfloat16(),
    )
    for kv_scale in (None, torch.tensor(0.02, device="cuda")):
        k_cache, v_cache = (
            torch.zeros(3, 2, 32, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2)
        )
        q = fused.rope_cache(
            qkv,
            cos,
            sin,
            torch.zeros(1, dtype=torch.long, device="cuda"),
            k_cache,
            v_cache,
            8,
            2,
            64,
            kv_scale,
            False,
        )
        q2, k2, v2 = resident.split_rotate(qkv, cos[:9], sin[:9], 8, 2, 64)
        # |x|·|cos| + |rotate_half(x)|·|sin|: the size of the two products the rotation sums
        ones, zeros = torch.ones_like(cos[:9]).float(), torch.zeros_like(sin[:9]).float()
        magnitude_q, magnitude_k = (
            t.abs() * cos[:9].float().abs() + t.abs().roll(32, dims=-1) * sin[:9].float().abs()
            for t in resident.split_rotate(qkv.float(), ones, zeros, 8, 2, 64)[:2]
        )
        if kv_scale is not None:
            k2, v2 = (fp8_round_trip(t, kv_scale).bfloat16() for t in (k2, v2))
        for got, expected, magnitude, scale in (
            (q, q2, magnitude_q, None),
            (k_cache[:2, :, :9], k2, magnitude_k, kv_scale),
        ):
            # The eager path rounds both products and their sum to bf16 (unit roundoff
            # u = 2^-8): |eager - exact| <= u(1+u)·magnitude + u·|sum|; the kernel sums in fp32
            # and rounds once: <= u·|sum|. Cancellation makes |sum| << magnitude, so the bound is
            # on the products, not on the result.
            u = 2.0**-8
            bound = u * (1 + u) * magnitude + 2 * u * expected.float().abs() + 1e-6
            if scale is not None:
                # then both are rounded to e4m3: a bf16 difference can move a value across a
                # rounding boundary, one e4m3 step (2^-3 relative, scale·2^-9 subnormal) apart
                bound = 2.0**-3 * (expected.float().abs() + bound) + float(scale) * 2.0**-9 + bound
            assert ((got.float() - expected.float()).abs() <= bound).all()
        assert (
            torch.equal(v_cache[:2, :, :9], v2) if kv_scale is None else True
        )  # v: copied, not rotated
        assert not k_cache[:, :, 9:].any() and not k_cache[2].any()  # nothing else written


@NEEDS_CUDA
def test_fused_decode_attention_rounds_like_the_eager_path():
    """The tiled decode attention (builder/runtime/fused.py) against the eager path: scores
    and output rounded to bf16 alike, softmax in fp32; it rounds the tiles' unnormalized
    probabilities where the eager path rounds the normalized ones, and sums in another order.
    """
    from builder.runtime import fused, resident

    if not fused_available():
        pytest.skip("Triton is not importable")
    torch.manual_seed(0)
    batch, q_heads, kv_heads, max_seq, head_dim, span, pos = 3, 16, 2, 1024, 128, 512, 300
    k_cache, v_cache = (
        torch.randn(batch, kv_heads, max_seq, head_dim, device="cuda").bfloat16() for _ in range(2)
    )
    q = (2 * torch.randn(batch, q_heads, 1, head_dim, device="cuda")).bfloat16()
    valid = torch.arange(max_seq, device="cuda")[:span] <= pos
    scale = head_dim**-0.5
    keys, values = k_cache[:, :, :span], v_cache[:, :, :span]
    qg = q.reshape(batch, kv_heads, -1, head_dim)
    scores = torch.matmul(qg, keys.transpose(-1, -2))
    probs = resident.softmax_attend(scores, valid, scale)
    expected = torch.matmul(probs, values).reshape(batch, 1, q_heads * head_dim)
    got = fused.decode_attention(q, k_cache, v_cache, valid, scale, kv_heads)
    # With u = 2^-8 (bf16's unit roundoff): each path rounds every probability once (u·p_j
    # each, 2u·p_j apart); another fp32 summation order can flip a score's rounding by u of
    # itself, moving its probability by at most u·|z| and the normalization by u·max|z| (z
    # the scaled scores); the outputs' own roundings can differ by one step (u·|out|). So
    # |got - expected| <= u·|out| + u·(3 + 2·max|z|)·sum_j p_j·|v_j|.
    u = 2.0**-8
    z = (scores.float() * scale).masked_fill(~valid, 0).abs().amax()
    spread = torch.matmul(probs.float(), values.float().abs()).reshape(expected.shape)
    bound = u * expected.float().abs() + u * (3 + 2 * z) * spread + 1e-6
    assert ((got.float() - expected.float()).abs() <= bound).all()
    assert (got != expected).float().mean() <= 0.5  # most elements still round alike
    a_scale = torch.tensor(0.01, device="cuda")
    got8 = fused.decode_attention(q, k_cache, v_cache, valid, scale, kv_heads, a_scale)
    assert got8.dtype == torch.float8_e4m3fn
    a, b = got8.float(), resident.quantize(got, a_scale).float()  # its bf16 output, quantized
    assert (a != b).float().mean() <= 0.01  # a fast division may cross a rounding midpoint
    assert ((a - b).abs() <= 0.13 * b.abs() + 1e-6).all()  # by one e4m3 step at most


def fused_available() -> bool:
    from builder.runtime.gemv import available

    return available()

#!/usr/bin/env python
"""The resident runtime on a GPU at Ultra's real layer shapes: BF16 against FP8, beside the HBM
limit.

One run measures, with random weights synthesized on the device (no checkpoint on disk), a
slice of consecutive Ultra blocks with their real dimensions (hidden 16384, 128 heads, 8 KV
heads, head dim 128, the blocks' own FFN widths) at the per-rank shapes of TP8 and TP4:

  copy        device-to-device copy bandwidth (bytes read + written / time): the HBM ceiling
  check       FP8 on tensor cores (_scaled_mm) against the emulation (the executor's CPU
              math, run on the device in fp32) on the same weights and tokens, with the BF16
              model's distance as the FP8 quantization-error scale
  prefill     tokens/s of one forward over batch x seq prompt tokens, BF16 and FP8, and
              W8A16 (INT8 weights per channel as TensorRT-LLM's build rounds them, BF16
              activations: FP8's bytes, BF16 GEMMs; builder quantize --recipe w8a16)
  decode      one decode step (CUDA graph replay, attention over the cache, norms, residuals
              included) at batch 1, 8 and 64; bytes read per step (resident linear weights +
              the KV-cache span attended) over the measured copy bandwidth is the floor
  profile     batch-1 decode steps by kernel (torch.profiler), BF16 and FP8

The runtime is builder.runtime.resident.ResidentRuntime built with `from_tensors` from the
rank's tensors in the checkpoint's own names and layout (rank 0 of tp; the collectives left out:
one GPU's share). Slice: Ultra layers 148-157 (no-op; fused FFN 301056; FFN-only 21504; GQA with
FFN 21504, 26624; no-op; GQA with 26624, 26624, 37376, 53248), vocabulary 1024 (a stand-in
lm_head; its bytes are counted).

Usage: python scripts/bench_gpu.py --out $OUT          (on the GPU machine)
       python scripts/bench_gpu.py --small --out /tmp/x  (CPU smoke test of the same code path)
       python scripts/bench_gpu.py --records-from OUT/bench_gpu.json --out DIR
                                  (run records of a saved result, no GPU needed)
Results: OUT/bench_gpu.json, and one builder run record per (tp, precision, batch) decode point
under OUT/records (render with `builder report OUT/records`); a table is printed last.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

import torch

from builder.arch import parse_config, preset_config, rank_tensors
from builder.arch.formats import LinearFormat, Recipe
from builder.arch.tensors import scale_names
from builder.convert.trtllm_config import trtllm_config
from builder.quantize.export_trtllm import trtllm_quantization
from builder.quantize.fp8 import quantize_trtllm, trtllm_scale
from builder.runtime.gemv import CHOOSER, MAX_ROWS
from builder.runtime.resident import ResidentRuntime

SLICE = range(148, 158)
VOCAB = 1024
ACTIVATION_AMAX = 10.0  # random weights: unit-variance activations, a few sigma


# ---- model ---------------------------------------------------------------------------------------
def slice_plan(small: bool):
    config = preset_config("ultra-253b")
    config["block_configs"] = [config["block_configs"][i] for i in SLICE]
    config["num_hidden_layers"] = len(SLICE)
    config["vocab_size"] = VOCAB
    if small:  # the same blocks at a CPU-friendly size (16 heads -> 1 KV head at tp 8)
        config["hidden_size"], config["num_attention_heads"], config["head_dim"] = 256, 16, 16
        for block in config["block_configs"]:
            if block["attention"].get("n_heads_in_group"):
                block["attention"]["n_heads_in_group"] = 2
    return parse_config(config, "ultra-253b layers 148-157")


def synth_rank(plan, tp: int, device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Rank 0's BF16 tensors, in the checkpoint's names and per-rank shapes, made on `device`."""
    gen = torch.Generator(device=device).manual_seed(seed)
    out = {}
    for item in rank_tensors(plan, tp, 1, 0):
        if len(item.shape) == 1:  # norms: around 1
            out[item.name] = (1 + 0.05 * torch.randn(item.shape, generator=gen, device=device)).to(
                torch.bfloat16
            )
        else:
            std = 1.0 if item.name.endswith("vocab_embedding.weight") else item.shape[1] ** -0.5
            out[item.name] = (
                torch.randn(item.shape, generator=gen, device=device, dtype=torch.bfloat16) * std
            )
    return out


def fp8_rank(plan, tp: int, bf16: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The FP8 rank as the exporter writes it: every linear but lm_head as e4m3 with per-tensor
    scales, fc and gate sharing the larger of their two weight scales."""
    out = {}
    for item in rank_tensors(plan, tp, 1, 0):
        tensor = bf16[item.name]
        if not item.rule.linear or item.name == "lm_head.weight":
            out[item.name] = tensor
            continue
        group = [item.name]
        if item.name.endswith((".ffn.fc.weight", ".ffn.gate.weight")):
            stem = item.name.rsplit(".", 2)[0]
            group = [f"{stem}.fc.weight", f"{stem}.gate.weight"]
        amax = max(float(bf16[name].abs().max()) for name in group)
        w_scale = trtllm_scale(amax).to(tensor.device)
        w_name, a_name = scale_names(item.name)
        out[item.name] = quantize_trtllm(tensor, w_scale, chunk_bytes=1 << 30)
        out[w_name], out[a_name] = w_scale, trtllm_scale(ACTIVATION_AMAX).to(tensor.device)
    return out


PRECISIONS = ("bf16", "fp8", "w8a16")


def precision_list(text: str) -> list[str]:
    names = text.split(",")
    unknown = [n for n in names if n not in PRECISIONS]
    if unknown:
        raise argparse.ArgumentTypeError(f"{unknown} not among {', '.join(PRECISIONS)}")
    return names


def configs(plan, tp: int) -> dict[str, dict]:
    w8a16 = Recipe.uniform(LinearFormat.W8A16).trtllm_quantization(plan, kv_cache=False)
    return {
        "bf16": trtllm_config(plan, tp),
        "fp8": trtllm_config(plan, tp, quantization=trtllm_quantization(False)),
        "w8a16": trtllm_config(plan, tp, quantization=w8a16),  # the build rounds BF16 weights
    }


# ---- timing -----------------------------------------------------------------------------------
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, device, warmup: int = 2, repeat: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return sorted(times)[len(times) // 2]


def copy_bandwidth(device, gib: float) -> dict:
    n = int(gib * (1 << 30)) // 2
    src = torch.randn(n, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, warmup=3, repeat=20)
    return {"bytes_each_way": src.nbytes, "ms": ms, "bandwidth_GBps": 2 * src.nbytes / ms / 1e6}


def relative_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    return float((actual.double() - reference.double()).norm() / reference.double().norm())


# ---- measurements --------------------------------------------------------------------------------
def build(config, tensors, device, args, **kwargs) -> ResidentRuntime:
    return ResidentRuntime.from_tensors(
        config,
        [tensors],
        rank=0,
        device=device,
        dtype=torch.bfloat16,
        max_batch=max(args.batches),
        max_seq=args.max_seq,
        compile=args.compile,
        **kwargs,
    )


def check_fp8(cfgs, bf16, fp8, device, args) -> dict:
    """Tensor cores against the emulation on the same weights and a 1 x 32 prompt.

    In fp32 compute the two differ only by the GEMMs' fp32 summation order (and the e4m3
    roundings that flips), which must be far below the FP8 quantization error (FP8 vs BF16
    weights, both fp32). In bf16 compute, both also carry bf16 execution noise, shown beside.
    """
    ids = torch.randint(0, VOCAB, (1, 32), generator=torch.Generator().manual_seed(7))
    runs = {
        "fp8_scaled_mm_fp32": ("fp8", fp8, "scaled-mm", torch.float32),
        "fp8_emulate_fp32": ("fp8", fp8, "emulate", torch.float32),
        "fp8_scaled_mm_bf16": ("fp8", fp8, "scaled-mm", torch.bfloat16),
        "fp8_emulate_bf16": ("fp8", fp8, "emulate", torch.bfloat16),
        "bf16_weights_fp32": ("bf16", bf16, "scaled-mm", torch.float32),
    }
    logits, tokens, gemms = {}, {}, []
    for name, (precision, tensors, gemm, dtype) in runs.items():
        rt = ResidentRuntime.from_tensors(
            cfgs[precision],
            [tensors],
            rank=0,
            device=device,
            dtype=dtype,
            fp8_gemm=gemm,
            max_batch=1,
            max_seq=64,
            compile=args.compile,
        )
        logits[name] = rt.prefill(ids)[0].cpu()
        tokens[name] = rt.generate(ids, 4)[0].tolist()
        if (
            name == "fp8_scaled_mm_fp32"
        ):  # every GEMM alone, same e4m3 input: fp32 summation order only
            gen = torch.Generator(device=device).manual_seed(1)
            for part, linear in rt.fp8_linears():
                k = linear.weight_t.shape[0]
                xq = (
                    (torch.randn(16, k, device=device, generator=gen) * 100)
                    .clamp(-448, 448)
                    .to(torch.float8_e4m3fn)
                )
                out = linear(xq)
                gemms.append(
                    {
                        "part": part,
                        "k": k,
                        "n": linear.out_features,
                        "relative_error": relative_error(
                            out, linear.with_gemm("emulate", torch.float32)(xq)
                        ),
                    }
                )
        del rt
    rel = relative_error
    return {
        "tokens": ids.shape[1],
        "gemm_max_relative_error_scaled_mm_vs_emulation": max(g["relative_error"] for g in gemms),
        "gemms": gemms,
        "fp32_scaled_mm_vs_emulation": rel(
            logits["fp8_scaled_mm_fp32"], logits["fp8_emulate_fp32"]
        ),
        "fp8_quantization_error": rel(logits["fp8_emulate_fp32"], logits["bf16_weights_fp32"]),
        "bf16_scaled_mm_vs_emulation": rel(
            logits["fp8_scaled_mm_bf16"], logits["fp8_emulate_bf16"]
        ),
        "bf16_execution_noise": rel(logits["fp8_emulate_bf16"], logits["fp8_emulate_fp32"]),
        "argmax_agreement_fp32": float(
            (logits["fp8_scaled_mm_fp32"].argmax(-1) == logits["fp8_emulate_fp32"].argmax(-1))
            .float()
            .mean()
        ),
        "greedy_tokens": tokens,
    }


def bench_prefill(rt, device, shapes) -> list[dict]:
    rows = []
    for batch, seq in shapes:
        ids = torch.randint(0, VOCAB, (batch, seq), device=device)
        ms = median_ms(lambda ids=ids: rt.prefill(ids), device, warmup=1, repeat=3)
        rows.append({"batch": batch, "seq": seq, "ms": ms, "tokens_per_s": batch * seq / ms * 1e3})
    return rows


def bench_decode(rt, device, batches, prompt: int, steps: int, copy_bw: float) -> list[dict]:
    rows = []
    for batch in batches:
        ids = torch.randint(0, VOCAB, (batch, prompt), device=device)
        token = rt.prefill(ids)[:, -1].argmax(-1)
        rt.decode(token)  # captures the graph for (batch, span)
        span = rt.span_for(rt.length)

        def steps_fn(token=token, start=rt.length):
            for _ in range(steps):
                rt.decode(token)
            rt.length = start  # back to the same position: every repeat stays in this span
            rt.pos.fill_(start)

        ms = median_ms(steps_fn, device, warmup=1, repeat=5) / steps
        weights, kv = rt.linear_bytes, rt.kv_bytes_read(batch, span)
        floor_ms = (weights + kv) / copy_bw / 1e6
        rows.append(
            {
                "batch": batch,
                "span": span,
                "step_ms": ms,
                "tokens_per_s": batch / ms * 1e3,
                "weight_bytes": weights,
                "kv_bytes": kv,
                "floor_ms": floor_ms,
                "fraction_of_copy_bandwidth": floor_ms / ms,
                "effective_GBps": (weights + kv) / ms / 1e6,
            }
        )
    return rows


def profile_decode(rt, device, steps: int = 20, top: int = 15) -> dict:
    """Batch-1 decode steps by kernel (CUDA time), from the graph replays."""
    from torch.profiler import ProfilerActivity, profile

    ids = torch.randint(0, VOCAB, (1, 128), device=device)
    token = rt.prefill(ids)[:, -1].argmax(-1)
    rt.decode(token)
    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            rt.decode(token)
        sync(device)
    return kernel_table(prof, steps, top)


def profile_prefill(rt, device, shape, top: int = 12) -> dict:
    """One prefill of `shape` (batch, seq) by kernel."""
    from torch.profiler import ProfilerActivity, profile

    ids = torch.randint(0, VOCAB, shape, device=device)
    rt.prefill(ids)
    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        rt.prefill(ids)
        sync(device)
    return {"shape": list(shape), **kernel_table(prof, 1, top)}


def kernel_table(prof, steps: int, top: int) -> dict:
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        if us > 0:
            rows.append(
                {
                    "kernel": e.key[:120],
                    "calls_per_step": e.count / steps,
                    "us_per_step": us / steps,
                }
            )
    rows.sort(key=lambda r: -r["us_per_step"])
    total = sum(r["us_per_step"] for r in rows)
    groups: dict[str, float] = {}
    for r in rows:
        groups[kernel_group(r["kernel"])] = (
            groups.get(kernel_group(r["kernel"]), 0.0) + r["us_per_step"]
        )
    return {
        "steps": steps,
        "kernel_us_per_step": total,
        "kernels_per_step": sum(r["calls_per_step"] for r in rows),
        "by_group_us": groups,
        "top": rows[:top],
    }


def kernel_group(name: str) -> str:
    low = name.lower()
    if low.startswith("skinny"):
        return "skinny GEMM (triton)"
    if "triton" in low or low.startswith(("add_rms_norm", "silu_mul", "rope_cache")):
        return "fused elementwise (triton)"
    if "sdpa" in low or "flash" in low:
        return "attention (prefill)"
    if any(s in low for s in ("gemm", "nvjet", "cutlass", "sm90_xmma", "splitk", "sm90")):
        return "gemm (cuBLAS)"
    if any(s in low for s in ("copy", "memcpy", "memset", "cat", "index")):
        return "copies/index"
    return "other"


def environment(device) -> dict:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env |= {
            "gpu": props.name,
            "multiprocessors": props.multi_processor_count,
            "memory_GiB": round(props.total_memory / (1 << 30), 1),
        }
        try:
            smi = subprocess.run(
                [
                    "nvidia-smi",
                    "--query-gpu=driver_version,clocks.max.sm,clocks.max.mem",
                    "--format=csv,noheader",
                ],
                capture_output=True,
                text=True,
                timeout=20,
                check=False,
            )
            env["nvidia_smi"] = smi.stdout.strip()
        except (OSError, subprocess.SubprocessError) as err:
            env["nvidia_smi"] = f"unavailable: {err}"
        try:
            import triton

            env["triton"] = triton.__version__
        except ImportError:
            env["triton"] = None
    return env


def check_fused(device) -> dict:
    """builder/runtime/fused.py's Triton chains against the eager functions (the executor's ops)
    on bf16 rows of Ultra's width: share of elements that differ, and the largest difference."""
    from builder.runtime import fused, resident

    gen = torch.Generator(device=device).manual_seed(5)
    x, d = (
        torch.randn(64, 16384, device=device, generator=gen, dtype=torch.bfloat16) for _ in range(2)
    )
    w = (1 + 0.05 * torch.randn(16384, device=device, generator=gen)).to(torch.bfloat16)
    fc_gate = 3 * torch.randn(64, 2 * 6656, device=device, generator=gen, dtype=torch.bfloat16)
    scale = torch.tensor(10.0 / 448, device=device)
    pairs = {
        "add_norm": (fused.add_norm(x, d, w, 1e-5), resident.add_norm(x, d, w, 1e-5)),
        "add_norm_quant": (
            fused.add_norm_quant(x, d, w, 1e-5, scale),
            resident.add_norm_quant(x, d, w, 1e-5, scale),
        ),
        "silu_mul": ((fused.silu_mul(fc_gate, 6656),), (resident.silu_mul(fc_gate, 6656),)),
        "silu_mul_quant": (
            (fused.silu_mul_quant(fc_gate, 6656, scale),),
            (resident.silu_mul_quant(fc_gate, 6656, scale),),
        ),
    }
    from builder.runtime.executor import fp8_round_trip

    qkv = torch.randn(4, 64, 18 * 128, device=device, generator=gen, dtype=torch.bfloat16)
    angles = torch.arange(256, device=device)[:, None] * torch.rand(
        64, device=device, generator=gen
    )
    cos, sin = (
        f(torch.cat([angles, angles], -1)).to(torch.bfloat16) for f in (torch.cos, torch.sin)
    )
    for kv_scale in (None, torch.tensor(0.02, device=device)):
        caches = [
            torch.zeros(4, 1, 256, 128, device=device, dtype=torch.bfloat16) for _ in range(2)
        ]
        q = fused.rope_cache(
            qkv,
            cos,
            sin,
            torch.zeros(1, dtype=torch.long, device=device),
            *caches,
            16,
            1,
            128,
            kv_scale,
            False,
        )
        q2, k2, v2 = resident.split_rotate(qkv, cos[:64], sin[:64], 16, 1, 128)
        if kv_scale is not None:
            k2, v2 = (fp8_round_trip(t, kv_scale).to(torch.bfloat16) for t in (k2, v2))
        name = "rope_cache" + ("_fp8_kv" if kv_scale is not None else "")
        pairs[name] = (
            (
                torch.cat(
                    [q.flatten(), caches[0][:, :, :64].flatten(), caches[1][:, :, :64].flatten()]
                ),
            ),
            (torch.cat([q2.flatten(), k2.flatten(), v2.flatten()]),),
        )
    out = {}
    for name, (got, expected) in pairs.items():
        got_last, exp_last = got[-1].float(), expected[-1].float()
        out[name] = {
            "mismatch_fraction": float((got_last != exp_last).float().mean()),
            "max_abs_difference": float((got_last - exp_last).abs().max()),
            "residual_equal": bool(torch.equal(got[0], expected[0])) if len(got) == 2 else None,
        }
    return out


def probe_compile(device) -> tuple[bool, str]:
    """Whether the fused (torch.compile) kernels build here; the bench runs eager if not."""
    from builder.runtime.resident import Kernels

    try:
        kernels = Kernels(compile=True)
        x = torch.randn(2, 3, 256, device=device, dtype=torch.bfloat16)
        w = torch.ones(256, device=device, dtype=torch.bfloat16)
        kernels.add_norm_quant(x, x, w, 1e-5, torch.tensor(0.1, device=device))
        kernels.silu_mul_quant(x, 128, torch.tensor(0.1, device=device))
        return True, "on"
    except Exception as err:  # noqa: BLE001 - any compiler failure: measure the eager path instead
        log(f"torch.compile unavailable ({type(err).__name__}: {err}); running eager")
        return False, f"failed: {type(err).__name__}: {str(err)[:300]}"


# ---- main ----------------------------------------------------------------------------------------
def run_tp(plan, tp, device, args, copy_bw) -> dict:
    t0 = time.perf_counter()
    bf16 = synth_rank(plan, tp, device, seed=tp)
    fp8 = fp8_rank(plan, tp, bf16)
    sync(device)
    cfgs = configs(plan, tp)
    result: dict = {"tp": tp, "synth_s": time.perf_counter() - t0}
    log(f"tp{tp}: rank tensors synthesized in {result['synth_s']:.1f} s")
    if args.check and tp in args.check_tp:
        result["check"] = check_fp8(cfgs, bf16, fp8, device, args)
        log(
            f"tp{tp}: check "
            f"{json.dumps({k: v for k, v in result['check'].items() if 'greedy' not in k})}"
        )
    for precision in args.precisions:
        tensors = fp8 if precision == "fp8" else bf16
        t0 = time.perf_counter()
        rt = build(cfgs[precision], tensors, device, args)
        sync(device)
        entry = {
            "build_s": time.perf_counter() - t0,
            "weight_bytes": rt.weight_bytes,
            "linear_bytes": rt.linear_bytes,
            "scaled_mm_row_multiple": rt.row_multiple() if precision == "fp8" else None,
        }
        entry["prefill"] = bench_prefill(rt, device, args.prefill)
        log(
            f"tp{tp} {precision}: prefill {[round(r['tokens_per_s']) for r in entry['prefill']]} "
            "tok/s"
        )
        if rt.gemv:  # each skinny linear's path chosen by the decode step it runs in
            entry["tuned_linears"] = tune_linears(rt, device, args, f"tp{tp} {precision}")
        entry["decode"] = bench_decode(rt, device, args.batches, args.prompt, args.steps, copy_bw)
        log(
            f"tp{tp} {precision}: decode {[round(r['step_ms'], 3) for r in entry['decode']]} "
            "ms/step"
        )
        if device.type == "cuda" and tp in args.profile_tp:
            entry["profile_batch1"] = profile_decode(rt, device)
            entry["profile_prefill"] = profile_prefill(rt, device, args.prefill[-1])
        if rt.kernels.decode_attention is not None:  # the same step, attention eager
            rt.set_fused_decode_attention(False)
            entry["decode_eager_attention"] = bench_decode(
                rt, device, [1], args.prompt, args.steps, copy_bw
            )
            rt.set_fused_decode_attention(True)
            log(
                f"tp{tp} {precision}: decode batch 1, eager attention "
                f"{entry['decode_eager_attention'][0]['step_ms']:.3f} ms/step"
            )
        entry["pdl"] = rt.pdl
        entry["decode_variants"] = decode_variants(rt, device, args, copy_bw, f"tp{tp} {precision}")
        if rt.gemv:  # the same step with every linear on cuBLAS, for comparison
            rt.set_gemv(False)
            entry["decode_cublas"] = bench_decode(rt, device, [1], args.prompt, args.steps, copy_bw)
            log(
                f"tp{tp} {precision}: decode batch 1 on cuBLAS "
                f"{entry['decode_cublas'][0]['step_ms']:.3f} ms/step"
            )
        entry["gemv"] = "triton skinny GEMM" if rt.gemv or "decode_cublas" in entry else "cuBLAS"
        if device.type == "cuda":
            entry["peak_memory_GiB"] = torch.cuda.max_memory_allocated(device) / (1 << 30)
        result[precision] = entry
        del rt
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
    del bf16, fp8
    return result


def decode_variants(rt, device, args, copy_bw, label: str) -> list[dict]:
    """Batch-1 decode of the same weights with one setting changed: the Triton kernels without
    programmatic dependent launch; the skinny paths as each GEMM timed alone ranks them,
    without the choices made in the step (each setting is restored after)."""
    variants = []
    if rt.gemv and rt.pdl:
        rt.set_pdl(False)
        (row,) = bench_decode(rt, device, [1], args.prompt, args.steps, copy_bw)
        rt.set_pdl(True)
        variants.append({"what": "no programmatic dependent launch", "pdl": False, **row})
        log(f"{label}: decode batch 1, no programmatic dependent launch: {row['step_ms']:.3f} ms")
    if rt.gemv and CHOOSER.overrides:  # the paths as each GEMM timed alone ranks them
        tuned = dict(CHOOSER.overrides)
        CHOOSER.overrides.clear()
        rt.drop_graphs()
        (row,) = bench_decode(rt, device, [1], args.prompt, args.steps, copy_bw)
        CHOOSER.overrides.update(tuned)
        rt.drop_graphs()
        variants.append({"what": "skinny paths chosen by each GEMM timed alone", **row})
        log(f"{label}: decode batch 1, paths chosen alone: {row['step_ms']:.3f} ms")
    return variants


def tune_linears(rt, device, args, label: str) -> list[dict]:
    """ResidentRuntime.tune_decode_linears at each benchmarked batch of skinny rows."""
    trials = []
    for batch in (b for b in args.batches if b <= MAX_ROWS):
        rt.prefill(torch.randint(0, VOCAB, (batch, args.prompt), device=device))
        t0 = time.perf_counter()
        found = [t.as_json() for t in rt.tune_decode_linears()]
        flipped = [f"{t['n']}x{t['k']}->{t['kept']}" for t in found if t["kept"] != "cublas"]
        log(
            f"{label}: batch {batch}: {len(found)} shapes tried in the step in "
            f"{time.perf_counter() - t0:.1f} s; Triton kept for {flipped}"
        )
        trials += found
    return trials


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def table(results: dict) -> str:
    env = results["environment"]
    lines = [
        (
            f"GPU: {env.get('gpu', 'cpu')}, torch {env['torch']}, "
            f"copy {results['copy']['bandwidth_GBps']:.0f} GB/s (read+write)"
        ),
        "| tp | what | BF16 | FP8 | FP8 speedup |",
        "|---|---|---|---|---|",
    ]
    for tp_result in (r for r in results["tp"] if "bf16" in r and "fp8" in r):
        tp = tp_result["tp"]
        b, f = tp_result["bf16"], tp_result["fp8"]
        for rb, rf in zip(b["prefill"], f["prefill"], strict=True):
            lines.append(
                f"| {tp} | prefill {rb['batch']}x{rb['seq']} tok/s | {rb['tokens_per_s']:,.0f} | "
                f"{rf['tokens_per_s']:,.0f} | {rf['tokens_per_s'] / rb['tokens_per_s']:.2f}x |"
            )
        for rb, rf in zip(b["decode"], f["decode"], strict=True):
            lines.append(
                f"| {tp} | decode batch {rb['batch']} ms/step (of copy BW) | {rb['step_ms']:.3f} "
                f"({rb['fraction_of_copy_bandwidth']:.0%}) | {rf['step_ms']:.3f} "
                f"({rf['fraction_of_copy_bandwidth']:.0%}) | {rb['step_ms'] / rf['step_ms']:.2f}x |"
            )
        for rb, rf in zip(
            b.get("decode_eager_attention", []), f.get("decode_eager_attention", []), strict=False
        ):
            lines.append(
                f"| {tp} | decode batch 1, attention eager (GEMM, softmax, GEMM) | "
                f"{rb['step_ms']:.3f} ({rb['fraction_of_copy_bandwidth']:.0%}) | "
                f"{rf['step_ms']:.3f} ({rf['fraction_of_copy_bandwidth']:.0%}) | "
                f"{rb['step_ms'] / rf['step_ms']:.2f}x |"
            )
        for rb, rf in zip(b.get("decode_variants", []), f.get("decode_variants", []), strict=False):
            lines.append(
                f"| {tp} | decode batch 1, {rf['what']} | {rb['step_ms']:.3f} "
                f"({rb['fraction_of_copy_bandwidth']:.0%}) | {rf['step_ms']:.3f} "
                f"({rf['fraction_of_copy_bandwidth']:.0%}) | {rb['step_ms'] / rf['step_ms']:.2f}x |"
            )
        for rb, rf in zip(b.get("decode_cublas", []), f.get("decode_cublas", []), strict=False):
            lines.append(
                f"| {tp} | decode batch 1, every linear on cuBLAS | {rb['step_ms']:.3f} "
                f"({rb['fraction_of_copy_bandwidth']:.0%}) | {rf['step_ms']:.3f} "
                f"({rf['fraction_of_copy_bandwidth']:.0%}) | {rb['step_ms'] / rf['step_ms']:.2f}x |"
            )
        if "check" in tp_result:
            c = tp_result["check"]
            lines.append(
                f"| {tp} | FP8 tensor cores vs emulation: worst GEMM; logits (FP8 vs BF16) | | "
                f"{c['gemm_max_relative_error_scaled_mm_vs_emulation']:.1e}; "
                f"{c['fp32_scaled_mm_vs_emulation']:.3f} ({c['fp8_quantization_error']:.3f}) | |"
            )
    return "\n".join(lines)


def w8a16_table(results: dict) -> str:
    """W8A16 beside BF16 (same GEMM dtype) and FP8 (same weight bytes)."""
    lines = [
        "| tp | what | BF16 | W8A16 | FP8 | W8A16 over BF16 | FP8 over W8A16 |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in (r for r in results["tp"] if "w8a16" in r):
        b, w, f = (run.get(p) for p in ("bf16", "w8a16", "fp8"))
        if b is None or f is None:
            continue
        for rb, rw, rf in zip(b["prefill"], w["prefill"], f["prefill"], strict=True):
            rate = [r["tokens_per_s"] for r in (rb, rw, rf)]
            lines.append(
                f"| {run['tp']} | prefill {rb['batch']}x{rb['seq']} tok/s | {rate[0]:,.0f} | "
                f"{rate[1]:,.0f} | {rate[2]:,.0f} | {rate[1] / rate[0]:.2f}x | "
                f"{rate[2] / rate[1]:.2f}x |"
            )
        for rb, rw, rf in zip(b["decode"], w["decode"], f["decode"], strict=True):
            ms = [r["step_ms"] for r in (rb, rw, rf)]
            cells = [
                f"{r['step_ms']:.3f} ({r['fraction_of_copy_bandwidth']:.0%})" for r in (rb, rw, rf)
            ]
            lines.append(
                f"| {run['tp']} | decode batch {rb['batch']} ms/step (of copy BW) | "
                f"{' | '.join(cells)} | {ms[0] / ms[1]:.2f}x | {ms[1] / ms[2]:.2f}x |"
            )
    return "\n".join(lines)


# ---- run records ---------------------------------------------------------------------------------
def _metric(value: float, unit: str, definition: str, better: str):
    from builder.report.records import Metric

    return Metric(float(value), unit, definition, better)


def run_records(results: dict) -> list:
    """One bench run record (docs/records.md) per decode point: `builder report` plots them
    (throughput vs batch with the copy-bandwidth floor as the roofline) and `builder report
    compare` gates a later run against them. Prefill rates ride along as metrics of the
    batch-1 point."""
    import hashlib

    from builder.report.records import Artifact, RecordKind, RunRecord

    env = results["environment"]
    copy_gbps = results["copy"]["bandwidth_GBps"]
    model = results["slice"].replace("ultra-253b layers ", "ultra-253b L")
    records = []
    for run in results["tp"]:
        for precision in (p for p in PRECISIONS if p in run):
            measured = run[precision]
            fingerprint = json.dumps(
                {
                    "layers": results["layers"],
                    "hidden": results["hidden"],
                    "tp": run["tp"],
                    "precision": precision,
                },
                sort_keys=True,
            )
            artifact = Artifact(
                path=f"synthetic:{results['slice']} tp{run['tp']} rank 0",
                kind=f"slice-{precision}-tp{run['tp']}",
                sha256=hashlib.sha256(fingerprint.encode()).hexdigest(),
            )
            for point in measured["decode"]:
                batch, step_ms = point["batch"], point["step_ms"]
                metrics = {
                    "output_token_throughput": _metric(
                        batch * 1e3 / step_ms,
                        "tok/s",
                        "batch / decode step time (CUDA graph "
                        "replay, attention, norms and residuals included)",
                        "higher",
                    ),
                    "tpot_p50": _metric(
                        step_ms,
                        "ms",
                        "median decode step time over repeats of "
                        f"{results['args']['steps']} replayed steps",
                        "lower",
                    ),
                    "decode_speed_per_user": _metric(
                        1e3 / step_ms, "tok/s/user", "1 / decode step time", "higher"
                    ),
                    "roofline_step_ms": _metric(
                        point["floor_ms"],
                        "ms",
                        "bytes read per step (resident linear weights "
                        f"+ KV span) / measured copy bandwidth ({copy_gbps:.0f} GB/s)",
                        "lower",
                    ),
                    "roofline_output_token_throughput": _metric(
                        batch * 1e3 / point["floor_ms"],
                        "tok/s",
                        "batch / copy-bandwidth floor of the step",
                        "higher",
                    ),
                    "roofline_fraction": _metric(
                        point["fraction_of_copy_bandwidth"],
                        "",
                        "copy-bandwidth floor / measured step time",
                        "higher",
                    ),
                }
                if batch == 1:
                    for shape in measured["prefill"]:
                        name = f"prefill_{shape['batch']}x{shape['seq']}_token_throughput"
                        metrics[name] = _metric(
                            shape["tokens_per_s"],
                            "tok/s",
                            f"prompt tokens / time of one forward over {shape['batch']} x "
                            f"{shape['seq']} tokens",
                            "higher",
                        )
                records.append(
                    RunRecord(
                        kind=RecordKind.BENCH,
                        model=model,
                        artifact=artifact,
                        runtime="resident",
                        target=f"tp{run['tp']} rank 0 (one GPU's share, collectives left out)",
                        device=env.get("gpu", "unknown"),
                        settings={
                            "workload": f"tp{run['tp']} decode {results['args']['prompt']}+"
                            f"{results['args']['steps']} @ batch {batch}",
                            "isl": results["args"]["prompt"],
                            "osl": results["args"]["steps"],
                            "concurrency": batch,
                            "tp": run["tp"],
                            "precision": precision,
                            "kv_cache": "bf16",
                            "note": "scripts/bench_gpu.py: builder's resident runtime (CUDA "
                            "graphs), random weights at Ultra's real dimensions; not a "
                            "TensorRT-LLM engine",
                        },
                        metrics=metrics,
                        details={
                            "kv_bytes": point["kv_bytes"],
                            "weight_bytes": point["weight_bytes"],
                            "profile_batch1": measured.get("profile_batch1"),
                        },
                        environment={
                            "versions": {k: v for k, v in env.items()},
                            "host": "GPU machine",
                            "git_commit": "",
                        },
                    )
                )
    return records


def write_run_records(results: dict, directory: Path) -> list[Path]:
    from builder.report.records import write_record

    return [write_record(directory, record) for record in run_records(results)]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tp", type=int, nargs="+", default=[8, 4])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument(
        "--prefill",
        type=lambda s: tuple(map(int, s.split("x"))),
        nargs="+",
        default=[(1, 2048), (8, 2048)],
        help="batch x seq shapes, e.g. 1x2048 8x2048",
    )
    parser.add_argument(
        "--prompt", type=int, default=128, help="prompt tokens before the decode steps"
    )
    parser.add_argument("--steps", type=int, default=32, help="decode steps per timing")
    parser.add_argument("--max-seq", type=int, default=2304)
    parser.add_argument("--profile-tp", type=int, nargs="*", default=[8])
    parser.add_argument(
        "--precisions",
        type=precision_list,
        default=list(PRECISIONS),
        help="comma-separated, of bf16,fp8,w8a16 (bf16 and fp8 are the main table's columns)",
    )

    parser.add_argument("--no-check", dest="check", action="store_false")
    parser.add_argument(
        "--check-tp", type=int, nargs="*", default=[8], help="TP layouts to run the FP8 check at"
    )
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument(
        "--small", action="store_true", help="hidden 256: a CPU smoke test of this script"
    )
    parser.add_argument(
        "--records-from",
        type=Path,
        help="write the run records of a saved bench_gpu.json to OUT/records and exit",
    )
    args = parser.parse_args()
    if args.records_from is not None:
        saved = json.loads(args.records_from.read_text())
        for path in write_run_records(saved, args.out / "records"):
            print(path)
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        args.compile = False
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 emulation must stay fp32
    if args.compile:
        args.compile, results_compile = probe_compile(device)
    else:
        results_compile = "off"
    args.out.mkdir(parents=True, exist_ok=True)
    plan = slice_plan(args.small)
    results = {
        "environment": environment(device),
        "slice": f"ultra-253b layers {SLICE.start}-{SLICE.stop - 1}",
        "layers": [layer.short for layer in plan.layers],
        "hidden": plan.hidden_size,
        "heads": plan.num_attention_heads,
        "vocab": VOCAB,
        "compile": results_compile,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    results["copy"] = copy_bandwidth(device, 0.05 if args.small else 4.0)
    from builder.runtime import gemv

    if gemv.available():
        results["fused_vs_eager"] = check_fused(device)
        log(f"fused kernels vs eager: {json.dumps(results['fused_vs_eager'])}")
    log(f"copy bandwidth {results['copy']['bandwidth_GBps']:.0f} GB/s")
    results["tp"] = []
    for tp in args.tp:
        results["tp"].append(run_tp(plan, tp, device, args, results["copy"]["bandwidth_GBps"]))
        (args.out / "bench_gpu.json").write_text(json.dumps(results, indent=1) + "\n")

    results["skinny_gemm_choices"] = CHOOSER.summary()
    results["skinny_gemm_configs"] = gemv.tuned_configs()
    results["table"] = table(results) + "\n\n" + w8a16_table(results)
    (args.out / "bench_gpu.json").write_text(json.dumps(results, indent=1) + "\n")
    write_run_records(results, args.out / "records")
    print(results["table"])


if __name__ == "__main__":
    main()

"""Bench of a TensorRT-LLM checkpoint with one of builder's PyTorch runtimes, in this process.

Runtimes (`RUNTIMES`): "executor", the reference (TrtllmCheckpointExecutor: weights read from
the rank files as it goes), and "resident" (ResidentRuntime: weights loaded onto the device
once, a static KV cache; on CUDA, decode steps replayed as CUDA graphs and the Triton
kernels). Neither is an engine: every record names its runtime and says `settings.engine`
false. Concurrency is the batch size: the requests of a point run in batches of
`concurrency` sequences decoded together through the KV cache (prefill once, one token
per sequence per step), batch after batch. Every request of a batch is sent at the batch's
start and receives a token at every step, so TTFT includes the batch's prefill.

Beside the measurement each record carries the HBM roofline of a target profile for this
checkpoint's own layout (builder.deploy.planner: bytes read per GPU per decode step /
bandwidth), so a CPU run still shows where a real GPU bound lies.
"""

from __future__ import annotations

import hashlib
import json
import platform
import resource
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder.bench.metrics import RequestTimeline, run_metrics, to_metrics
from builder.bench.workload import Workload, synthetic_prompts
from builder.errors import UserError
from builder.registry import Registry
from builder.report.records import Artifact, Metric, RecordKind, RunRecord
from builder.units import GIB

Opener = Callable[[Path, str, str, list[Workload]], Any]
"""(checkpoint, dtype name, device, the points to run) -> a context manager whose value has
`greedy(prompts, osl)` (-> executor.Generation), `plan`, `tp`, `pp` and `kv_cache_fp8`."""


@dataclass(frozen=True)
class InProcessRuntime:
    open: Opener
    note: str  # every record's settings.note: what ran, and that it is not an engine


def open_executor(directory: Path, dtype: str, device: str, points: list[Workload]):
    import torch

    from builder.runtime import TrtllmCheckpointExecutor

    return TrtllmCheckpointExecutor(
        directory, dtype=getattr(torch, dtype), device=device, keep_weights=True
    )


def open_resident(directory: Path, dtype: str, device: str, points: list[Workload]):
    import torch

    from builder.runtime.resident import ResidentRuntime

    return ResidentRuntime.from_checkpoint(
        directory,
        dtype=getattr(torch, dtype),
        device=device,
        max_batch=max(p.concurrency for p in points),
        max_seq=max(p.isl + p.osl for p in points),
    )


RUNTIMES: Registry[InProcessRuntime] = Registry("in-process runtime")
RUNTIMES.register("executor")(
    InProcessRuntime(
        open_executor,
        "builder's PyTorch reference executor, not a TensorRT-LLM engine; "
        "concurrency = batch size (static batches)",
    )
)
RUNTIMES.register("resident")(
    InProcessRuntime(
        open_resident,
        "builder's resident runtime (weights on the device; CUDA graphs and Triton kernels on "
        "a GPU), not a TensorRT-LLM engine; concurrency = batch size (static batches)",
    )
)


def checkpoint_artifact(directory: Path, config: dict[str, Any]) -> tuple[str, Artifact]:
    """(model name, artifact) of a TensorRT-LLM checkpoint: sha256 of its manifest (which
    lists every file's hash), else of its config."""
    manifest = directory / "manifest.json"
    source = directory / "config.json"
    model = directory.name
    if manifest.is_file():
        source = manifest
        try:
            model = Path(json.loads(manifest.read_text())["source"]["path"]).name or model
        except (KeyError, TypeError, ValueError):
            pass
    quant = (config.get("quantization") or {}).get("quant_algo")
    dtype = str(config.get("dtype", "bf16")).replace("bfloat16", "bf16")
    kind = f"trtllm-{'fp8' if quant == 'FP8' else dtype}"
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    return model, Artifact(str(directory.resolve()), kind, digest)


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{cpu_model()}, {torch.get_num_threads()} torch threads"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def reset_peak_memory(device: str) -> None:
    """Starts a new peak: CUDA's allocator statistics, or Linux's VmHWM (clear_refs 5)."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(torch.device(device))
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux: ru_maxrss, the process's lifetime peak, is what remains


def peak_memory_bytes(device: str) -> int:
    """Peak since reset_peak_memory: CUDA max_memory_allocated, else the resident set's
    high-water mark (VmHWM; ru_maxrss where /proc is missing)."""
    import torch

    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated(torch.device(device)))
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: KiB on Linux, bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def roofline(directory: Path, target: str, concurrency: int, context: int) -> dict[str, Any]:
    """The planner's decode bound for this checkpoint's plan, tp/pp and precision on
    `target`'s hardware, at `concurrency` sequences of `context` cached tokens."""
    from builder.deploy.planner import decode_bound, rank_memory
    from builder.deploy.profiles import load_profile, with_overrides
    from builder.io.trtllm_checkpoint import mapping_of, read_trtllm_config

    config, plan = read_trtllm_config(directory)
    tp, pp = mapping_of(config)
    quant = config.get("quantization") or {}
    profile = with_overrides(
        load_profile(target),
        [
            ("parallel.tp", tp),
            ("parallel.pp", pp),
            ("precision.weights", "fp8" if quant.get("quant_algo") == "FP8" else "bf16"),
            ("precision.kv_cache", "fp8" if quant.get("kv_cache_quant_algo") == "FP8" else "bf16"),
        ],
    )
    memories = [rank_memory(plan, profile, rank) for rank in range(tp * pp)]
    bound = decode_bound(profile, memories, concurrency, context)
    return {
        "target": profile.name,
        "gpu": profile.hardware.gpu,
        "hbm_bandwidth_tbs": profile.hardware.hbm_bandwidth_tbs,
        **bound.to_dict(),
    }


def run_point(
    executor, workload: Workload, exclude: frozenset[int]
) -> tuple[dict[str, float], int]:
    """One repeat of one point: its metrics and the KV cache bytes of its batches."""
    prompts = synthetic_prompts(
        executor.plan.vocab_size, workload.isl, workload.requests, workload.seed, exclude
    )
    timelines, kv_bytes = [], 0
    for first in range(0, len(prompts), workload.concurrency):
        batch = prompts[first : first + workload.concurrency]
        generation = executor.greedy(batch, workload.osl)  # no eos: exactly osl tokens
        kv_bytes = max(kv_bytes, generation.kv_cache_bytes)
        for tokens in generation.tokens:
            if len(tokens) != workload.osl:
                raise RuntimeError(f"generated {len(tokens)} tokens, expected {workload.osl}")
            timelines.append(
                RequestTimeline(
                    generation.start, generation.token_times, workload.isl, workload.osl
                )
            )
    return run_metrics(timelines), kv_bytes


def warm_up(executor, workload: Workload, exclude: frozenset[int]) -> None:
    if workload.warmup:
        prompts = synthetic_prompts(
            executor.plan.vocab_size, workload.isl, workload.warmup, workload.seed + 1, exclude
        )
        for first in range(0, len(prompts), workload.concurrency):
            executor.greedy(prompts[first : first + workload.concurrency], workload.osl)


def bench_checkpoint(
    directory: str | Path,
    points: list[Workload],
    dtype: str = "float32",
    device: str = "cpu",
    target: str = "h200x8-bf16",
    progress: Callable[[str], None] | None = None,
    threads: int | None = None,
    runtime: str = "executor",
) -> list[RunRecord]:
    """One record per workload point (ISL, OSL, concurrency), repeats inside it, run by
    `runtime` (a RUNTIMES name). `threads` sets torch's CPU threads for the run (small models
    on a busy machine: 1; OpenMP barriers dominate tiny matmuls otherwise)."""
    import torch

    chosen = RUNTIMES.get(runtime)
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _bench_checkpoint(
            Path(directory), points, dtype, device, target, progress, runtime, chosen
        )
    finally:
        torch.set_num_threads(before)


def _bench_checkpoint(
    directory: Path,
    points: list[Workload],
    dtype: str,
    device: str,
    target: str,
    progress: Callable[[str], None] | None,
    runtime: str,
    chosen: InProcessRuntime,
) -> list[RunRecord]:
    import torch

    if not (directory / "config.json").is_file():
        raise UserError(f"{directory}: not a TensorRT-LLM checkpoint (no config.json)")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine")
    records = []
    with chosen.open(directory, dtype, device, points) as executor:
        model, artifact = checkpoint_artifact(directory, executor.config)
        exclude = frozenset()  # any vocabulary id may appear: OSL is fixed, EOS is never checked
        for number, point in enumerate(points, start=1):
            if progress:
                progress(
                    f"[{number}/{len(points)}] {point.key}: {point.warmup} warm-up + "
                    f"{point.repeat} x {point.requests} requests"
                )
            reset_peak_memory(device)
            warm_up(executor, point, exclude)
            repeats, kv_bytes = [], 0
            for _ in range(point.repeat):
                values, kv = run_point(executor, point, exclude)
                repeats.append(values)
                kv_bytes = max(kv_bytes, kv)
            metrics = to_metrics(repeats)
            bound = roofline(directory, target, point.concurrency, point.isl + point.osl // 2)
            metrics.update(extra_metrics(peak_memory_bytes(device), kv_bytes, bound, metrics))
            records.append(
                RunRecord(
                    kind=RecordKind.BENCH,
                    model=model,
                    artifact=artifact,
                    runtime=runtime,
                    target=f"{directory.resolve()} (in-process {runtime})",
                    device=device_name(device),
                    settings={
                        **point.settings(),
                        "engine": False,
                        "dtype": dtype,
                        "device": device,
                        "torch_threads": torch.get_num_threads(),
                        "tp": executor.tp,
                        "pp": executor.pp,
                        "kv_cache": "fp8" if executor.kv_cache_fp8 else dtype,
                        "note": chosen.note,
                    },
                    metrics=metrics,
                    details={"roofline": bound},
                )
            )
    return records


def extra_metrics(
    peak: int, kv_bytes: int, bound: dict[str, Any], metrics: dict[str, Metric]
) -> dict[str, Metric]:
    from builder.bench.metrics import OTHER

    def one(name: str, value: float) -> Metric:
        d = OTHER[name]
        return Metric(value, d.unit, d.definition, d.better)

    out = {
        "peak_memory": one("peak_memory", peak / GIB),
        "kv_cache_memory": one("kv_cache_memory", kv_bytes / GIB),
        "roofline_step_ms": one("roofline_step_ms", bound["step_ms_at_concurrency"]),
        "roofline_output_token_throughput": one(
            "roofline_output_token_throughput", bound["tokens_per_s_aggregate"]
        ),
    }
    if "decode_speed_per_user" in metrics:
        out["roofline_fraction"] = one(
            "roofline_fraction",
            metrics["decode_speed_per_user"].value * bound["step_ms_at_concurrency"] / 1e3,
        )
    return out

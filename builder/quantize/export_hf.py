"""Unified HF FP8 checkpoint (ModelOpt's `export_hf_checkpoint` format), written by streaming.

`export_hf_checkpoint` needs the whole calibrated model in memory. This writer produces the
same files from the source checkpoint plus the amax table, one row block at a time:
  - every decoder linear: `weight` float8_e4m3fn = E4M3(W / weight_scale) (division in the
    model dtype, as ModelOpt does), `weight_scale` = w_amax / 448 and `input_scale` =
    x_amax / 448 (0-dim fp32; linears that read the same input share the max input scale);
  - real attention layers: `self_attn.k_proj.k_scale`, `self_attn.v_proj.v_scale` = amax / 448;
  - embedding, norms and lm_head in the model dtype;
  - `hf_quant_config.json` and `config.json` with `quantization_config` (converted by
    ModelOpt's own `convert_hf_quant_config_format`), `block_configs` unchanged.
tests/quantize prove the tensors and quantization configs equal `export_hf_checkpoint`'s.

Every tensor is a tuple of independent row-block jobs (each maps or reads its own rows), run
in file order by one writer, with `workers` threads computing up to 2 x workers blocks ahead
(the e4m3 lookups were single-threaded: 23 s for 6 GB on a 16-core host, 4.1x cp).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from builder.arch.plan import ModelPlan
from builder.arch.tensors import (
    ROLES,
    group_roles,
    hf_channel_scale_name,
    hf_fp8_excludes,
    hf_kv_scale_name,
    hf_module,
    hf_scale_names,
    hf_tensor_shapes,
    linear_module,
    parse_hf_name,
)
from builder.convert.sources import cast_checked
from builder.errors import UserError
from builder.io.checkpoint import INDEX_NAME, HFCheckpoint
from builder.io.safetensors_stream import (
    FileSpan,
    SafetensorsStreamWriter,
    TensorSpec,
    WrittenFile,
    map_range,
)
from builder.quantize.amax import AmaxTable
from builder.quantize.formats import (
    LinearFormat,
    Recipe,
    code_dtype,
    format_scales,
    weight_codes,
)
from builder.quantize.fp8 import FP8, hf_e4m3_table, lookup_e4m3, quantize_hf, scale_from_amax
from builder.quantize.rounding import RoundingStore, module_layer

EXCLUDED = hf_fp8_excludes()
COPIED_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)
DEFAULT_SHARD_BYTES = 5 * (1 << 30)
CHUNK_BYTES = 64 * (1 << 20)


Job = Callable[[], Any]  # one row block of a tensor: a FileSpan, bytes or a torch tensor


@dataclass(frozen=True)
class OutTensor:
    """One tensor of the export and the jobs that produce its row blocks, in order. Each job
    reads its own rows, so jobs run in any order or in parallel (`run_in_order`)."""

    spec: TensorSpec
    jobs: tuple[Job, ...]


@dataclass(frozen=True)
class Lease:
    """A block written into a reused buffer, which goes back to `buffers` once written."""

    data: np.ndarray
    buffer: np.ndarray
    buffers: Buffers


class Buffers:
    """Output buffers reused block after block (a fresh 32 MiB buffer costs its page faults:
    +15-25% on a lookup). At most as many exist as blocks are in flight at once."""

    def __init__(self, size: int):
        self.size = size
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()

    def get(self, size: int) -> np.ndarray:
        with self._lock:
            for k, buffer in enumerate(self._free):
                if buffer.size >= size:
                    return self._free.pop(k)
        return np.empty(max(size, self.size), dtype=np.uint8)

    def put(self, buffer: np.ndarray) -> None:
        with self._lock:
            self._free.append(buffer)


class MappedSource:
    """Row ranges of the checkpoint's tensors as FileSpans, each over its own mapping, so
    jobs on several threads read at once; a mapping goes when the writer and its hasher have
    dropped their views of it. One descriptor per file, closed by `close`; the buffers of
    the e4m3 lookups."""

    def __init__(self, ckpt: HFCheckpoint):
        self.ckpt = ckpt
        self.buffers = Buffers(CHUNK_BYTES // 2)  # an e4m3 block of a 16-bit CHUNK_BYTES
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

    def lookup(self, name: str, rows: slice | None, table: np.ndarray) -> Lease:
        """The e4m3 bytes of 16-bit rows through `table` (fp8.lookup_e4m3), read from the
        mapping, into a reused buffer."""
        bits = np.frombuffer(self.span(name, rows).view, dtype=np.uint16)
        buffer = self.buffers.get(bits.size)
        data = lookup_e4m3(table, bits, buffer[: bits.size])
        return Lease(data, buffer, self.buffers)

    def span(self, name: str, rows: slice | None) -> FileSpan:
        file, offset, size = self.ckpt.data_location(name)
        if rows is not None:
            row_bytes = size // self.ckpt.info(name).shape[0]
            offset, size = offset + rows.start * row_bytes, (rows.stop - rows.start) * row_bytes
        fd = self._fd(file)
        mm, at = map_range(fd, offset, size)
        return FileSpan(fd, offset, memoryview(mm)[at:])

    def _fd(self, file: Path) -> int:
        with self._lock:
            if file not in self._fds:
                self._fds[file] = os.open(file, os.O_RDONLY)
            return self._fds[file]

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


def run_in_order(jobs: Iterable[Job], pool: ThreadPoolExecutor | None, depth: int) -> Iterator[Any]:
    """The jobs' blocks in order, up to `depth` computed ahead on `pool` (None: each job when
    its block is asked for). A block is valid until the next one is asked for."""
    jobs = iter(jobs)
    pending: deque[Future] = deque()
    try:
        while True:
            while pool is not None and len(pending) < depth:
                job = next(jobs, None)
                if job is None:
                    break
                pending.append(pool.submit(job))
            if pending:
                block = pending.popleft().result()
            else:
                job = next(jobs, None)
                if job is None:
                    return
                block = job()
            if isinstance(block, Lease):
                yield block.data
                block.buffers.put(block.buffer)
            else:
                yield block
    finally:
        for future in pending:
            future.cancel()


def modelopt_version() -> str:
    from importlib.metadata import version

    return version("nvidia-modelopt")


def hf_quant_config(
    kv_cache: bool, recipe: Recipe | None = None, plan: ModelPlan | None = None
) -> dict[str, Any]:
    """hf_quant_config.json; a recipe with several formats writes ModelOpt's MIXED_PRECISION
    layout (builder.arch.formats)."""
    if recipe is None or plan is None:
        quantization = {
            "quant_algo": "FP8",
            "kv_cache_quant_algo": "FP8" if kv_cache else None,
            "exclude_modules": list(EXCLUDED),
        }
    else:
        quantization = recipe.hf_quantization(plan, kv_cache, list(EXCLUDED))
    return {
        "producer": {"name": "modelopt", "version": modelopt_version()},
        "quantization": quantization,
    }


def quantization_config(
    kv_cache: bool, recipe: Recipe | None = None, plan: ModelPlan | None = None
) -> dict[str, Any]:
    """config.json's `quantization_config`, as ModelOpt converts hf_quant_config.json."""
    from builder.quantize.recipe import quiet

    with quiet():
        from modelopt.torch.export.convert_hf_config import convert_hf_quant_config_format

        return convert_hf_quant_config_format(hf_quant_config(kv_cache, recipe, plan))


def shared_input_amax(table: AmaxTable, module: str) -> float:
    """Input amax of `module`, maxed over the linears that read the same tensor."""
    name = parse_hf_name(f"{module}.weight")
    group = ROLES[name.role].scale_group
    if group is None:
        return table.input(module)
    return max(table.input(hf_module(role, name.layer)) for role in group_roles(group))


def _row_ranges(ckpt: HFCheckpoint, name: str) -> list[slice | None]:
    """Row ranges of a checkpoint tensor of at most about CHUNK_BYTES each (None: a 1-D
    tensor, whole)."""
    info = ckpt.info(name)
    if len(info.shape) < 2:
        return [None]
    row_bytes = info.shape[1] * max(info.dtype.itemsize, 2)
    step = max(1, CHUNK_BYTES // row_bytes)
    return [slice(a, min(a + step, info.shape[0])) for a in range(0, info.shape[0], step)]


def _read_jobs(
    ckpt: HFCheckpoint, name: str, convert: Callable[[torch.Tensor, int], torch.Tensor]
) -> tuple[Job, ...]:
    """Jobs reading row blocks of a checkpoint tensor as tensors, each `convert(block,
    first_row)`ed."""

    def job(rows: slice | None) -> torch.Tensor:
        return convert(ckpt.read(name, rows=rows), rows.start if rows else 0)

    return tuple(partial(job, rows) for rows in _row_ranges(ckpt, name))


def _scalar(value: torch.Tensor) -> tuple[Job, ...]:
    return (lambda: value,)


def plan_tensors(
    plan: ModelPlan,
    source: MappedSource,
    table: AmaxTable,
    dtype: torch.dtype,
    recipe: Recipe | None = None,
    rounding: RoundingStore | None = None,
) -> list[OutTensor]:
    """Every tensor of the export, in model order, with its jobs (`recipe`: each linear's
    format, default per-tensor FP8 everywhere; `rounding`: stored codes to write instead of
    rounding the source weights to nearest)."""
    formats = (recipe or Recipe()).by_hf_module(plan)
    out: list[OutTensor] = []
    for name, shape in hf_tensor_shapes(plan).items():
        module = name.removesuffix(".weight")
        fmt = formats.get(module, LinearFormat.BF16)
        if fmt.quantized and rounding is not None:
            out.extend(_stored_tensors(rounding, table, name, shape, fmt))
        elif fmt is LinearFormat.BF16:
            out.append(OutTensor(TensorSpec(name, shape, dtype), _cast_jobs(source, name, dtype)))
        elif fmt.per_channel:
            out.extend(_channel_tensors(source.ckpt, name, shape, dtype, fmt))
        else:
            out.extend(_tensor_fp8_tensors(source, table, name, shape, dtype))
        role = parse_hf_name(name)
        if table.kv_cache and ROLES[role.role].cache:
            k_amax, v_amax = table.kv(role.layer)
            amax = k_amax if ROLES[role.role].cache == "k" else v_amax
            kv_name = hf_kv_scale_name(role.role, role.layer)
            out.append(
                OutTensor(TensorSpec(kv_name, (), torch.float32), _scalar(scale_from_amax(amax)))
            )
    return out


def _byte_path(ckpt: HFCheckpoint, name: str, dtype: torch.dtype) -> bool:
    """True when `name` is stored in `dtype` at a known offset: its bytes can be streamed
    (kernel copies, or a table lookup) instead of read and converted as tensors."""
    return ckpt.info(name).dtype == dtype and ckpt.data_location(name) is not None


def _tensor_fp8_tensors(
    source: MappedSource, table: AmaxTable, name: str, shape: tuple, dtype: torch.dtype
) -> list[OutTensor]:
    """Per-tensor FP8: the weight through quantize_hf's e4m3 table (streamed from the file
    when it is stored in the export dtype), 0-dim `weight_scale` and `input_scale`."""
    module = linear_module(name)
    w_scale = scale_from_amax(table.weight(module))
    x_scale = scale_from_amax(shared_input_amax(table, module))
    w_name, x_name = hf_scale_names(module)
    return [
        OutTensor(TensorSpec(name, shape, FP8), _fp8_jobs(source, name, dtype, w_scale)),
        OutTensor(TensorSpec(w_name, (), torch.float32), _scalar(w_scale)),
        OutTensor(TensorSpec(x_name, (), torch.float32), _scalar(x_scale)),
    ]


def _stored_tensors(
    store: RoundingStore, table: AmaxTable, name: str, shape: tuple, fmt: LinearFormat
) -> list[OutTensor]:
    """A linear whose codes were chosen during calibration (GPTQ): the stored E4M3 codes in
    row blocks, the scale they were made with (per tensor: the one q/k/v or gate/up share,
    which TensorRT-LLM's fused GEMM needs; each HF module stores its own `weight_scale`, so
    the shared value is as valid there), and the input scale as nearest rounding writes it."""
    module = linear_module(name)
    stored = store.shape(module, fmt)
    if tuple(stored) != tuple(shape):
        raise UserError(
            f"{store.path(module_layer(module), fmt)}: {module} codes have shape {stored}, "
            f"the checkpoint's weight {list(shape)}"
        )
    step = max(1, CHUNK_BYTES // max(1, shape[1]))
    codes = tuple(
        partial(store.codes, module, fmt, slice(a, min(a + step, shape[0])))
        for a in range(0, shape[0], step)
    )
    scale = store.scale(module, fmt)
    out = [OutTensor(TensorSpec(name, shape, code_dtype(fmt)), codes)]
    if fmt is LinearFormat.FP8:
        w_name, x_name = hf_scale_names(module)
        x_scale = scale_from_amax(shared_input_amax(table, module))
        out += [
            OutTensor(TensorSpec(w_name, (), torch.float32), _scalar(scale.reshape(()))),
            OutTensor(TensorSpec(x_name, (), torch.float32), _scalar(x_scale)),
        ]
    else:
        spec = TensorSpec(hf_channel_scale_name(module), (shape[0],), torch.float32)
        out.append(OutTensor(spec, _scalar(scale.reshape(-1))))
    return out


def _channel_tensors(
    ckpt: HFCheckpoint, name: str, shape: tuple, dtype: torch.dtype, fmt: LinearFormat
) -> list[OutTensor]:
    """A per-channel format: per-channel FP8 (ModelOpt's FP8_PC_PT export: E4M3 weight) or
    W8A16 (its int8_wo export: INT8 weight), a weight scale fp32 [out], no input scale
    (activations are scaled per token at run time, or not quantized). Row blocks hold whole
    rows, so each block's scales are final."""
    module = linear_module(name)
    file = ckpt.info(name).file

    def weights(t: torch.Tensor, row: int) -> torch.Tensor:
        block = cast_checked(t, dtype, name, file, row)
        return weight_codes(fmt, block, format_scales(fmt, block))

    def scales(t: torch.Tensor, row: int) -> torch.Tensor:
        return format_scales(fmt, cast_checked(t, dtype, name, file, row))

    return [
        OutTensor(TensorSpec(name, shape, code_dtype(fmt)), _read_jobs(ckpt, name, weights)),
        OutTensor(
            TensorSpec(hf_channel_scale_name(module), (shape[0],), torch.float32),
            _read_jobs(ckpt, name, scales),
        ),
    ]


def _cast_jobs(source: MappedSource, name: str, dtype: torch.dtype) -> tuple[Job, ...]:
    """A tensor in the export dtype: its bytes as they are (kernel copies, no NaN scan, as
    the tensor path has none for an unchanged dtype); else read and cast with range checks."""
    ckpt = source.ckpt
    if _byte_path(ckpt, name, dtype):
        return tuple(partial(source.span, name, rows) for rows in _row_ranges(ckpt, name))
    file = ckpt.info(name).file
    return _read_jobs(ckpt, name, lambda t, row: cast_checked(t, dtype, name, file, row))


def _fp8_jobs(
    source: MappedSource, name: str, dtype: torch.dtype, scale: torch.Tensor
) -> tuple[Job, ...]:
    """A per-tensor FP8 weight: a 16-bit one stored in the export dtype goes through
    quantize_hf's bits for every 16-bit pattern (a table lookup on the mapped bytes), any
    other through quantize_hf itself."""
    ckpt = source.ckpt
    if _byte_path(ckpt, name, dtype) and dtype in (torch.bfloat16, torch.float16):
        table = hf_e4m3_table(dtype, scale)
        return tuple(partial(source.lookup, name, rows, table) for rows in _row_ranges(ckpt, name))
    file = ckpt.info(name).file
    return _read_jobs(
        ckpt, name, lambda t, row: quantize_hf(cast_checked(t, dtype, name, file, row), scale)
    )


def shard_tensors(tensors: list[OutTensor], shard_bytes: int) -> list[list[OutTensor]]:
    """Greedy consecutive shards of at most `shard_bytes` (a bigger tensor gets its own)."""
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.spec.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.spec.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{k:05d}-of-{count:05d}.safetensors" for k in range(1, count + 1)]


def export_config(
    source_config: dict[str, Any],
    kv_cache: bool,
    dtype: torch.dtype,
    recipe: Recipe | None = None,
    plan: ModelPlan | None = None,
) -> dict[str, Any]:
    """The source config.json plus `quantization_config`, with ModelOpt's deployment fixes."""
    from builder.quantize.recipe import quiet

    config = copy.deepcopy(dict(source_config))
    config["architectures"] = config.get("architectures") or ["DeciLMForCausalLM"]
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    with quiet():
        from modelopt.torch.export.plugins import sanitize_hf_config_for_deployment

        sanitize_hf_config_for_deployment(
            config, None
        )  # e.g. rope_theta inside llama3 rope_scaling
    config["quantization_config"] = quantization_config(kv_cache, recipe, plan)
    return config


def _write_shards(
    out: Path,
    shards: list[list[OutTensor]],
    names: list[str],
    workers: int,
    progress: Callable[[str], None] | None,
) -> tuple[list[WrittenFile], dict[str, str]]:
    """Each shard's file, its tensors' blocks from one ordered stream of every job (so the
    workers run ahead across tensor and file boundaries)."""
    written: list[WrittenFile] = []
    weight_map: dict[str, str] = {}
    pool = ThreadPoolExecutor(workers, "hf-export") if workers > 1 else None
    blocks = run_in_order((job for s in shards for t in s for job in t.jobs), pool, 2 * workers)
    try:
        for file_name, shard in zip(names, shards, strict=True):
            with SafetensorsStreamWriter(
                out / file_name, [t.spec for t in shard], {"format": "pt"}
            ) as writer:
                for tensor in shard:
                    writer.start(tensor.spec.name)
                    for _ in tensor.jobs:
                        writer.append(next(blocks))
                    writer.finish()
                    weight_map[tensor.spec.name] = file_name
                    if progress:
                        progress(tensor.spec.name)
            written.append(writer.result)
    finally:
        blocks.close()  # cancels the blocks not yet started
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return written, weight_map


def write_unified_hf(
    out: Path,
    plan: ModelPlan,
    ckpt: HFCheckpoint,
    table: AmaxTable,
    dtype: torch.dtype = torch.bfloat16,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: Callable[[str], None] | None = None,
    recipe: Recipe | None = None,
    workers: int = 1,
    rounding: RoundingStore | None = None,
) -> list[WrittenFile]:
    """Write the unified HF FP8 checkpoint into the (staging) directory `out` (`recipe`: the
    format of each linear; default per-tensor FP8).

    `workers` threads compute row blocks ahead of the writer (the e4m3 lookups, the reads
    from the mapped source and torch's casts release the GIL), at most 2 x workers blocks of
    at most CHUNK_BYTES in flight; the files are the same bytes for any `workers`.
    Returns the weight files written, with their digest computed while writing.
    """
    if workers < 1:
        raise UserError(f"export workers must be at least 1 (got {workers})")
    table.validate(plan)
    source = MappedSource(ckpt)
    try:
        tensors = plan_tensors(plan, source, table, dtype, recipe, rounding)
        shards = shard_tensors(tensors, shard_bytes)
        names = shard_names(len(shards))
        written, weight_map = _write_shards(out, shards, names, workers, progress)
    finally:
        source.close()
    if len(names) > 1:
        total = sum(t.spec.nbytes for t in tensors)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    (out / "hf_quant_config.json").write_text(
        json.dumps(hf_quant_config(table.kv_cache, recipe, plan), indent=4) + "\n"
    )
    config = export_config(dict(plan.hf_config), table.kv_cache, dtype, recipe, plan)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in COPIED_FILES:
        if (ckpt.root / name).is_file():
            shutil.copy2(ckpt.root / name, out / name)
    return written

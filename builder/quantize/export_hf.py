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
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
from builder.convert.sources import Piece, SourceReader, cast_checked
from builder.io.checkpoint import INDEX_NAME, HFCheckpoint
from builder.io.safetensors_stream import (
    FileSpan,
    SafetensorsStreamWriter,
    TensorSpec,
    WrittenFile,
    as_bytes,
)
from builder.quantize.amax import AmaxTable
from builder.quantize.formats import LinearFormat, Recipe, channel_scales, quantize_channels
from builder.quantize.fp8 import FP8, TableQuantizer, hf_e4m3_table, quantize_hf, scale_from_amax

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


@dataclass(frozen=True)
class OutTensor:
    """One tensor of the export and how to produce it in row blocks."""

    spec: TensorSpec
    blocks: Callable[[], Iterator[torch.Tensor]]


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


def _row_blocks(
    ckpt: HFCheckpoint, name: str, convert: Callable[[torch.Tensor, int], torch.Tensor]
) -> Iterator[torch.Tensor]:
    """`convert(block, first_row)`ed row blocks of a checkpoint tensor, each at most about
    CHUNK_BYTES."""
    info = ckpt.info(name)
    if len(info.shape) < 2:
        yield convert(ckpt.read(name), 0)
        return
    row_bytes = info.shape[1] * max(info.dtype.itemsize, 2)
    step = max(1, CHUNK_BYTES // row_bytes)
    for start in range(0, info.shape[0], step):
        yield convert(ckpt.read(name, rows=slice(start, min(start + step, info.shape[0]))), start)


def _scalar(value: torch.Tensor) -> Callable[[], Iterator[torch.Tensor]]:
    return lambda: iter([value])


def plan_tensors(
    plan: ModelPlan,
    ckpt: HFCheckpoint,
    table: AmaxTable,
    dtype: torch.dtype,
    recipe: Recipe | None = None,
) -> list[OutTensor]:
    """Every tensor of the export, in model order, with its producer (`recipe`: each linear's
    format, default per-tensor FP8 everywhere)."""
    formats = (recipe or Recipe()).by_hf_module(plan)
    out: list[OutTensor] = []
    for name, shape in hf_tensor_shapes(plan).items():
        module = name.removesuffix(".weight")
        fmt = formats.get(module, LinearFormat.BF16)
        if fmt is LinearFormat.BF16:
            out.append(OutTensor(TensorSpec(name, shape, dtype), _cast_blocks(ckpt, name, dtype)))
        elif fmt is LinearFormat.FP8_PC_PT:
            out.extend(_channel_tensors(ckpt, name, shape, dtype))
        else:
            out.extend(_tensor_fp8_tensors(ckpt, table, name, shape, dtype))
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


def _stream_blocks(
    ckpt: HFCheckpoint, name: str, dtype: torch.dtype, convert: TableQuantizer | None = None
) -> Iterator[Any]:
    """Row blocks of `name` straight from the file (convert's reader; no NaN scan, as the
    tensor path has none for an unchanged dtype), each through `convert` if given."""
    info = ckpt.info(name)
    piece = Piece(name, slice(0, info.shape[0]) if len(info.shape) > 1 else None)
    with SourceReader(ckpt, dtype, CHUNK_BYTES, check_finite=False) as reader:
        for block in reader.piece_blocks(piece):
            if convert is None:
                yield block
            else:
                yield convert(block.view if isinstance(block, FileSpan) else as_bytes(block))


def _tensor_fp8_tensors(
    ckpt: HFCheckpoint, table: AmaxTable, name: str, shape: tuple, dtype: torch.dtype
) -> list[OutTensor]:
    """Per-tensor FP8: the weight through quantize_hf's e4m3 table (streamed from the file
    when it is stored in the export dtype), 0-dim `weight_scale` and `input_scale`."""
    module = linear_module(name)
    w_scale = scale_from_amax(table.weight(module))
    x_scale = scale_from_amax(shared_input_amax(table, module))
    w_name, x_name = hf_scale_names(module)
    return [
        OutTensor(TensorSpec(name, shape, FP8), _fp8_blocks(ckpt, name, dtype, w_scale)),
        OutTensor(TensorSpec(w_name, (), torch.float32), _scalar(w_scale)),
        OutTensor(TensorSpec(x_name, (), torch.float32), _scalar(x_scale)),
    ]


def _channel_tensors(
    ckpt: HFCheckpoint, name: str, shape: tuple, dtype: torch.dtype
) -> list[OutTensor]:
    """Per-channel FP8 (ModelOpt's FP8_PC_PT export): E4M3 weight, a weight scale fp32 [out],
    no input scale (activations are scaled per token at run time). Row blocks hold whole
    rows, so each block's scales are final."""
    module = linear_module(name)
    file = ckpt.info(name).file

    def cast(t: torch.Tensor, row: int) -> torch.Tensor:
        return cast_checked(t, dtype, name, file, row)

    def weights() -> Iterator[torch.Tensor]:
        for block in _row_blocks(ckpt, name, cast):
            yield quantize_channels(block, channel_scales(block))

    def scales() -> Iterator[torch.Tensor]:
        for block in _row_blocks(ckpt, name, cast):
            yield channel_scales(block)

    return [
        OutTensor(TensorSpec(name, shape, FP8), weights),
        OutTensor(TensorSpec(hf_channel_scale_name(module), (shape[0],), torch.float32), scales),
    ]


def _cast_blocks(
    ckpt: HFCheckpoint, name: str, dtype: torch.dtype
) -> Callable[[], Iterator[torch.Tensor]]:
    if _byte_path(ckpt, name, dtype):
        return lambda: _stream_blocks(ckpt, name, dtype)
    file = ckpt.info(name).file
    return lambda: _row_blocks(ckpt, name, lambda t, row: cast_checked(t, dtype, name, file, row))


def _fp8_blocks(
    ckpt: HFCheckpoint, name: str, dtype: torch.dtype, scale: torch.Tensor
) -> Callable[[], Iterator[torch.Tensor]]:
    if _byte_path(ckpt, name, dtype) and dtype in (torch.bfloat16, torch.float16):
        table = hf_e4m3_table(dtype, scale)  # quantize_hf's bits for every 16-bit pattern
        return lambda: _stream_blocks(ckpt, name, dtype, TableQuantizer(table))
    file = ckpt.info(name).file
    return lambda: _row_blocks(
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


def write_unified_hf(
    out: Path,
    plan: ModelPlan,
    ckpt: HFCheckpoint,
    table: AmaxTable,
    dtype: torch.dtype = torch.bfloat16,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: Callable[[str], None] | None = None,
    recipe: Recipe | None = None,
) -> list[WrittenFile]:
    """Write the unified HF FP8 checkpoint into the (staging) directory `out` (`recipe`: the
    format of each linear; default per-tensor FP8).

    Returns the weight files written, with their sha256 computed while writing.
    """
    table.validate(plan)
    tensors = plan_tensors(plan, ckpt, table, dtype, recipe)
    shards = shard_tensors(tensors, shard_bytes)
    names = shard_names(len(shards))
    written: list[WrittenFile] = []
    weight_map: dict[str, str] = {}
    for file_name, shard in zip(names, shards, strict=True):
        with SafetensorsStreamWriter(
            out / file_name, [t.spec for t in shard], {"format": "pt"}
        ) as writer:
            for tensor in shard:
                writer.write_blocks(tensor.spec.name, tensor.blocks())
                weight_map[tensor.spec.name] = file_name
                if progress:
                    progress(tensor.spec.name)
        written.append(writer.result)
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

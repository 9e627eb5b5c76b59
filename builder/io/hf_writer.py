"""Writing HF-layout checkpoints shard by shard (model-0000k-of-0000n.safetensors + index).

Tensors arrive from an iterator; at most one shard is held in memory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from builder.io.checkpoint import INDEX_NAME

DEFAULT_SHARD_BYTES = 1 << 30
SHARD_MODE = 0o644


def _flush(stage: Path, number: int, shard: dict[str, torch.Tensor]) -> tuple[Path, list[str]]:
    path = stage / f".shard-{number:05d}.safetensors"
    save_file(shard, str(path), metadata={"format": "pt"})
    # safetensors' save_file writes through a private temporary file (mode 0600); shards are
    # published like every other output file.
    os.chmod(path, SHARD_MODE)
    return path, list(shard)


def write_hf_weights(
    directory: Path,
    tensors: Iterable[tuple[str, torch.Tensor]],
    shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> dict[str, Any]:
    """Write `tensors` as sharded safetensors plus `model.safetensors.index.json`.

    Returns the index. Shards are renamed to their final `-of-N` names once N is known.
    """
    shards: list[tuple[Path, list[str]]] = []
    current: dict[str, torch.Tensor] = {}
    current_bytes = total = 0
    for name, tensor in tensors:
        size = tensor.numel() * tensor.element_size()
        if current and current_bytes + size > shard_bytes:
            shards.append(_flush(directory, len(shards) + 1, current))
            current, current_bytes = {}, 0
        current[name] = tensor.contiguous()
        current_bytes += size
        total += size
    if current:
        shards.append(_flush(directory, len(shards) + 1, current))
    weight_map: dict[str, str] = {}
    for number, (path, names) in enumerate(shards, start=1):
        final = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        path.rename(directory / final)
        weight_map.update(dict.fromkeys(names, final))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return index


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")

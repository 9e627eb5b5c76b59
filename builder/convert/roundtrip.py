"""Un-sharding a TensorRT-LLM checkpoint with the inverse rules, and comparing it with its
source."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from builder.arch.plan import ModelPlan, load_plan
from builder.arch.tensors import rank_tensors
from builder.convert.rank_writer import rank_file_name
from builder.convert.split import merge_tensor
from builder.convert.trtllm_config import mapping_of, read_trtllm_config
from builder.io.checkpoint import HFCheckpoint


def unshard(
    directory: str | Path, plan: ModelPlan | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Every HF tensor rebuilt from the rank files (merging each TP group, stage by stage).

    `plan` (the HF source's) decides source names, e.g. a tied lm_head maps back to
    `model.embed_tokens.weight`; by default the checkpoint's own config is used.
    """
    directory = Path(directory)
    config, own_plan = read_trtllm_config(directory)
    plan = plan or own_plan
    tp, pp = mapping_of(config)
    for pp_rank in range(pp):
        ranks = [pp_rank * tp + t for t in range(tp)]
        handles = [safe_open(str(directory / rank_file_name(r)), framework="pt") for r in ranks]
        for item in rank_tensors(plan, tp, pp, ranks[0]):
            parts = [h.get_tensor(item.name) for h in handles]
            layer = item.layer
            merged = merge_tensor(
                item.rule,
                parts,
                vocab=plan.vocab_size,
                heads=plan.num_attention_heads,
                kv_heads=layer.kv_heads if layer else None,
                head_dim=plan.head_dim,
                name=f"{item.name} (ranks {ranks[0]}-{ranks[-1]})",
            )
            names = item.rule.source_names(layer.index if layer else None)
            yield from zip(names, merged, strict=True)


def roundtrip_problems(
    directory: str | Path, hf_dir: str | Path, progress: Any | None = None
) -> list[str]:
    """Differences between the un-sharded checkpoint and the HF source, compared bit for bit.

    When the output dtype differs from the source's, the source is cast first (the
    comparison is then against what conversion should have written). `progress` is a
    builder.progress Reporter (one step per source tensor).
    """
    source = HFCheckpoint(hf_dir)
    plan = load_plan(hf_dir)
    problems, seen = [], set()
    if progress:
        progress.start("round trip", len(source.names()), "tensors")
    for name, tensor in unshard(directory, plan):
        seen.add(name)
        if progress:
            progress.advance("round trip", 1, note=name)
        if name not in source:
            problems.append(f"{name}: produced but not in the source")
            continue
        expected = source.read(name).to(tensor.dtype)
        if expected.shape != tensor.shape:
            problems.append(f"{name}: shape {list(tensor.shape)} != source {list(expected.shape)}")
        elif not torch.equal(_bits(expected), _bits(tensor)):
            diff = (expected.float() - tensor.float()).abs().max().item()
            problems.append(f"{name}: differs from the source (max abs difference {diff})")
    problems += [
        f"{name}: in the source but not rebuilt" for name in source.names() if name not in seen
    ]
    if progress:
        progress.finish("round trip", note="")
    return problems


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)

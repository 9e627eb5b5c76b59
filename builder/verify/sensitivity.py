"""Block-streamed accuracy of many recipes at once, and per-block / per-linear sensitivity.

One pass over the weights scores any number of recipes against the BF16 reference (the
computation `builder reference` stores as the golden): every recipe is a *stream* of cached
activations. At each block the reference block is loaded once; a stream whose recipe leaves
the block in BF16 runs it as is, a stream that quantizes it runs a copy with its linears
replaced by the format's emulation (builder.quantize.formats). A stream is the reference
itself until its first quantized block, so it costs nothing before it diverges. After the
last block, each stream's logits are compared with the reference's: mean and p99 of
KL(ref || stream) over the whole vocabulary, and top-1 agreement.

Memory is one block plus one activation cache per diverged stream, so Ultra still needs one
GPU: 81 single-block streams of 8 x 256 tokens hold 81 x 8 x 256 x 16,384 x 2 bytes = 5.4 GiB.
Compute is one block forward per stream per block after its divergence.

Sensitivity is that with one stream per candidate: the block (or one unit of it) in one
format, everything else BF16. The KV cache stays BF16 here: its format is a separate,
global choice.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from builder.arch.plan import LayerPlan
from builder.arch.tensors import hf_layer_prefix
from builder.quantize.amax import AmaxTable
from builder.quantize.export_hf import shared_input_amax
from builder.quantize.formats import (
    LinearFormat,
    Recipe,
    Unit,
    block_units,
    quantized_linear,
    unit_key_layer,
)
from builder.quantize.rounding import RoundingStore
from builder.verify import metrics

Progress = Callable[[int, int, LayerPlan], None]


@dataclass
class StreamScore:
    name: str
    recipe: Recipe
    kl: float = math.nan
    kl_p99: float = math.nan
    top1: float = math.nan

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kl": self.kl,
            "kl_p99": self.kl_p99,
            "top1": self.top1,
            "recipe": self.recipe.to_json(),
        }


def quantized_block(
    block: torch.nn.Module,
    layer: LayerPlan,
    formats: dict[Unit, LinearFormat],
    table: AmaxTable | None,
    rounding: RoundingStore | None = None,
) -> torch.nn.Module:
    """A copy of BF16 `block` with the given units' linears in their formats (`rounding`:
    the stored GPTQ codes and scales, which the exports write, instead of nearest rounding
    of the BF16 weights)."""
    out = copy.deepcopy(block)
    prefix = hf_layer_prefix(layer.index)
    for unit, fmt in formats.items():
        for module in unit.hf_modules:
            path = module.removeprefix(prefix)
            parent, leaf = path.rsplit(".", 1)
            w_amax = x_amax = None
            if fmt is LinearFormat.FP8:
                if table is None:
                    raise ValueError("per-tensor FP8 streams need the calibrated amax table")
                w_amax, x_amax = table.weight(module), shared_input_amax(table, module)
            linear = out.get_submodule(path)
            if rounding is not None:
                new = stored_linear(rounding, module, fmt, x_amax, linear.weight.device)
            else:
                new = quantized_linear(linear, fmt, w_amax, x_amax)
            setattr(out.get_submodule(parent), leaf, new)
    return out


def stored_linear(
    rounding: RoundingStore,
    module: str,
    fmt: LinearFormat,
    x_amax: float | None,
    device: torch.device,
) -> torch.nn.Module:
    """The emulation of `module` in `fmt` from its stored codes."""
    from builder.dtypes import FP8_MAX
    from builder.quantize.formats import RowwiseFp8Linear, TensorFp8Linear, WeightOnlyInt8Linear

    codes = rounding.codes(module, fmt).to(device)
    scale = rounding.scale(module, fmt).to(device)
    if fmt is LinearFormat.FP8_PC_PT:
        return RowwiseFp8Linear(codes, scale)
    if fmt is LinearFormat.W8A16:
        return WeightOnlyInt8Linear(codes, scale)
    x_scale = torch.tensor(x_amax, dtype=torch.float32, device=device) / FP8_MAX
    return TensorFp8Linear(codes, scale, x_scale)


@dataclass
class _Stream:
    score: StreamScore
    hidden: torch.Tensor | None = None  # None: still equal to the reference
    floor_at: int | None = None  # a floor stream: perturbed at this block by rounding only


class RoundingLinear(torch.nn.Module):
    """The same linear computed in fp32 and rounded back: a perturbation of rounding size.

    In a 16-bit stream any change to the residual makes the later blocks' roundings
    independent of the reference's, which costs KL by itself (SmolLM2 in bf16: about 0.001,
    the floor the issue measured for a bf16 cast). A stream perturbed only this way measures
    that floor at its block; a candidate's own KL is its excess over it.
    """

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.weight32 = linear.weight.detach().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x.float(), self.weight32).to(x.dtype)


def rounding_block(block: torch.nn.Module, layer: LayerPlan) -> torch.nn.Module:
    out = copy.deepcopy(block)
    prefix = hf_layer_prefix(layer.index)
    for unit in block_units(layer):
        for module in unit.hf_modules:
            parent, leaf = module.removeprefix(prefix).rsplit(".", 1)
            linear = out.get_submodule(f"{parent}.{leaf}")
            setattr(out.get_submodule(parent), leaf, RoundingLinear(linear))
    return out


@torch.no_grad()
def score_recipes(
    src: str | Path,
    recipes: dict[str, Recipe],
    windows: torch.Tensor,
    table: AmaxTable | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: str = "cpu",
    progress: Progress | None = None,
    batch: int = 4,
    floors: Sequence[int] = (),
    rounding: RoundingStore | None = None,
) -> dict[str, StreamScore]:
    """KL(ref || recipe) and top-1 agreement of every recipe on token `windows` [n, L];
    `floors`: block indices whose rounding floor is measured too (streams "floor N");
    `rounding`: quantized linears run their stored (GPTQ) codes."""
    from builder.verify.stream import BlockStream

    stream = BlockStream(Path(src), dtype=dtype, device=device, keep_blocks=False)
    plan = stream.plan
    streams = {name: _Stream(StreamScore(name, r)) for name, r in recipes.items()}
    for index in floors:
        bf16 = Recipe.uniform(LinearFormat.BF16)
        streams[f"floor {index}"] = _Stream(StreamScore(f"floor {index}", bf16), floor_at=index)
    for r in recipes.values():
        r.validate(plan)
    ids = windows.to(device)
    ref = torch.cat(
        [stream.embed(w)[0][None] for w in ids]
    )  # [n, L, hidden]; embed reads only the rows it needs
    total = sum(not layer.is_empty for layer in plan.layers)
    done = 0
    for layer, block in stream.blocks():
        if block is None:
            continue
        units = block_units(layer)
        variants: dict[tuple, torch.nn.Module] = {}
        for s in streams.values():
            if s.floor_at == layer.index:
                s.hidden = _run(stream, rounding_block(block, layer), ref, batch)
                continue
            formats = {u: s.score.recipe.format_of(u) for u in units}
            quantized = {u: f for u, f in formats.items() if f.quantized}
            if not quantized and s.hidden is None:
                continue  # still the reference
            key = tuple(sorted((u.key, f.value) for u, f in quantized.items()))
            if key not in variants:
                variants[key] = (
                    quantized_block(block, layer, quantized, table, rounding)
                    if quantized
                    else block
                )
            source = ref if s.hidden is None else s.hidden
            s.hidden = _run(stream, variants[key], source, batch)
        ref = _run(stream, block, ref, batch)
        del variants
        done += 1
        if progress:
            progress(done, total, layer)
    head = stream.head_weights()
    ref_logits = [stream.head(ref[i : i + 1], head) for i in range(ref.shape[0])]
    for s in streams.values():
        _finish(s, stream, head, ref, ref_logits)
    return {name: s.score for name, s in streams.items()}


def _run(stream: Any, block: torch.nn.Module, hidden: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat(
        [stream.run_block(block, hidden[i : i + batch]) for i in range(0, hidden.shape[0], batch)]
    )


def _finish(
    s: _Stream, stream: Any, head: Any, ref: torch.Tensor, ref_logits: list[torch.Tensor]
) -> None:
    kls, agree = [], []
    for i, golden in enumerate(ref_logits):
        logits = golden if s.hidden is None else stream.head(s.hidden[i : i + 1], head)
        kls.append(metrics.full_kl(golden, logits))
        agree.append(metrics.agreement(golden.argmax(-1), logits.argmax(-1)))
    kl = torch.cat(kls).clamp(min=0)
    s.score.kl = float(kl.mean())
    s.score.kl_p99 = float(torch.quantile(kl.float(), 0.99))
    s.score.top1 = float(torch.cat(agree).float().mean())
    s.hidden = None


# ---- sensitivity --------------------------------------------------------------------------
@dataclass
class Sensitivity:
    """KL each candidate causes alone (everything else BF16), by candidate key and format.

    A candidate is a block (`granularity="block"`: all its units in the format) or one unit
    (`"unit"`). `base` holds the score of every unit in each format at once (the uniform
    recipes), which calibrates how the single-candidate KLs add up.
    """

    granularity: str
    windows: int
    seq_len: int
    kl: dict[str, dict[str, float]] = field(default_factory=dict)  # key -> format -> KL
    top1: dict[str, dict[str, float]] = field(default_factory=dict)
    base: dict[str, StreamScore] = field(default_factory=dict)
    floor: dict[int, float] = field(default_factory=dict)  # block -> rounding floor KL
    seconds: float = 0.0

    def own(self, key: str, fmt: str) -> float:
        """The candidate's KL in `fmt` less the rounding floor at its block (at least a
        hundredth of the raw value, so a candidate never looks free)."""
        raw = self.kl[key][fmt]
        return max(raw - self.floor.get(candidate_layer(key), 0.0), raw / 100)

    def to_json(self) -> dict[str, Any]:
        return {
            "granularity": self.granularity,
            "windows": self.windows,
            "seq_len": self.seq_len,
            "kl": self.kl,
            "top1": self.top1,
            "uniform": {k: v.to_json() for k, v in self.base.items()},
            "floor": {str(k): v for k, v in self.floor.items()},
            "seconds": round(self.seconds, 3),
        }


BLOCK_CANDIDATE = "block {index}"


def candidate_layer(key: str) -> int:
    """The block a candidate key ("block 3" or the unit key "3.qkv") belongs to."""
    layer = unit_key_layer(key)
    return int(key.removeprefix(BLOCK_CANDIDATE.format(index=""))) if layer is None else layer


def candidates(plan: Any, granularity: str) -> dict[str, list[Unit]]:
    """Candidate key -> its units ("block 3" or "3.qkv")."""
    if granularity not in ("block", "unit"):
        raise ValueError(f"granularity {granularity!r}: choose block or unit")
    out: dict[str, list[Unit]] = {}
    for layer in plan.layers:
        units = block_units(layer)
        if not units:
            continue
        if granularity == "block":
            out[BLOCK_CANDIDATE.format(index=layer.index)] = units
        else:
            out.update({u.key: [u] for u in units})
    return out


def measure_sensitivity(
    src: str | Path,
    windows: torch.Tensor,
    table: AmaxTable | None,
    formats: Sequence[LinearFormat] = (LinearFormat.FP8, LinearFormat.FP8_PC_PT),
    granularity: str = "block",
    dtype: torch.dtype = torch.bfloat16,
    device: str = "cpu",
    progress: Progress | None = None,
    floor: bool = True,
    rounding: RoundingStore | None = None,
) -> Sensitivity:
    """One block-streamed pass: every candidate alone in every format, plus the uniform
    recipes (all units in one format) as reference points, plus (`floor`) each block's
    rounding floor in 16-bit dtypes (see RoundingLinear)."""
    from builder.arch import load_plan

    started = time.perf_counter()
    plan = load_plan(Path(src))
    cands = candidates(plan, granularity)
    recipes: dict[str, Recipe] = {}
    for key, units in cands.items():
        for fmt in formats:
            recipes[f"{key}|{fmt.value}"] = Recipe(LinearFormat.BF16, {u.key: fmt for u in units})
    for fmt in formats:
        recipes[f"uniform|{fmt.value}"] = Recipe.uniform(fmt)
    blocks = sorted({units[0].layer for units in cands.values()})
    floors = blocks if floor and torch.finfo(dtype).bits <= 16 else []
    scores = score_recipes(
        src, recipes, windows, table, dtype, device, progress, floors=floors, rounding=rounding
    )
    result = Sensitivity(granularity, int(windows.shape[0]), int(windows.shape[1]))
    for name, score in scores.items():
        if name.startswith("floor "):
            result.floor[int(name.split()[1])] = score.kl
            continue
        key, fmt = name.split("|")
        if key == "uniform":
            result.base[fmt] = score
            continue
        result.kl.setdefault(key, {})[fmt] = score.kl
        result.top1.setdefault(key, {})[fmt] = score.top1
    result.seconds = time.perf_counter() - started
    return result


def units_of(plan: Any, keys: Iterable[str], granularity: str) -> dict[str, list[Unit]]:
    cands = candidates(plan, granularity)
    return {k: cands[k] for k in keys}

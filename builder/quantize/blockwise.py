"""Block-by-block FP8 calibration with ModelOpt: memory is one block plus cached activations.

The loop order is swapped (block outer, batch inner), as in llm-compressor's sequential
pipeline, but every statistic is ModelOpt's own:

  1. embed the calibration windows (only the embedding rows they use are read);
  2. for each block that has weights: build it from a meta-device skeleton of the reference
     model, load its tensors from the HF checkpoint, `mtq.quantize` it with the FP8 recipe and a
     forward loop over the cached activations, read the amax of every enabled quantizer, free
     the block. ModelOpt's max calibration does not fake-quantize while it collects, so the
     outputs of that same forward loop are the unquantized inputs of the next block: one pass
     per block, and the amax equal whole-model calibration's (tests/quantize prove it);
  3. fully empty blocks (81 in Ultra) are skipped: no weights, no forward, no time.

Resumable: with a state directory, each block's amax is committed as soon as it is known and
the activations entering the next block every `save_every` blocks; a rerun with the same
source, data and options continues from the last saved activations.

Data parallel: under torch.distributed each rank calibrates its share of the batches and
every block's amax is all-reduced with MAX before it is recorded, so the table equals a
single process over all windows. Launch with torchrun; rank 0 writes state and exports.
"""

from __future__ import annotations

import copy
import gc
import json
import time
from collections.abc import Callable, Iterable
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from builder.arch.plan import LayerPlan, ModelPlan
from builder.arch.schema import AnyValue, Boolean, Integer, MapOf, Number, Object, validate
from builder.arch.tensors import Role, hf_layer_prefix, hf_weight
from builder.errors import UserError
from builder.io.checkpoint import CheckpointError, HFCheckpoint
from builder.io.prefetch import StreamStats, prefetch_by_default, prefetched
from builder.quantize import recipe
from builder.quantize.amax import AmaxError, AmaxTable, expected_keys, quantizer_amax, require_amax
from builder.quantize.calib import batches
from builder.quantize.rounding import (
    RoundingPlan,
    RoundingStore,
    missing_layers,
    register_hessians,
)

ROUNDING_DIR = "rounding"

STATE_VERSION = 1
STATE_SCHEMA = Object(
    {
        "version": Integer(),
        "fingerprint": AnyValue(),
        "next_layer": Integer(minimum=0),
        "complete": Boolean(),
    },
    required=frozenset({"version", "next_layer"}),
)
AMAX_SCHEMA = MapOf(Number(minimum=0))


class ResumeStateError(UserError):
    """Saved calibration state that cannot be read back (truncated, edited, wrong types)."""


EMBEDDING = hf_weight(Role.EMBEDDING)
LOAD_CHUNK_BYTES = 256 << 20
FULL_GC_BYTES = 16 << 20


class NonFiniteActivations(UserError):
    """Calibration activations that overflowed or became NaN."""


@dataclass(frozen=True)
class CalibOptions:
    kv_cache: bool = True
    device: str = "cpu"
    dtype: torch.dtype = torch.bfloat16
    batch_size: int = 4
    state_dir: Path | None = None  # resume state; None: nothing saved
    resume: bool = False
    save_every: int = 0  # save the activations every N calibrated blocks; 0: auto (see below)
    # load block i+1 while block i calibrates (builder.io.prefetch); None: on CUDA only
    prefetch: bool | None = None
    # --rounding gptq: each block's H from the same forward loop, its GPTQ codes stored in
    # state_dir/rounding (builder.quantize.rounding); None: nearest rounding, nothing stored
    rounding: RoundingPlan | None = None


@dataclass
class CalibResult:
    table: AmaxTable
    seconds: float = 0.0
    calibrated: list[int] = field(default_factory=list)
    resumed: list[int] = field(default_factory=list)
    skipped_empty: int = 0
    block_seconds: dict[int, float] = field(default_factory=dict)
    activation_bytes: int = 0  # cached activations held by this rank
    weights: StreamStats = field(default_factory=StreamStats)  # the blocks' weights streamed

    def summary(self) -> dict[str, Any]:
        return {
            "seconds": round(self.seconds, 3),
            "blocks_calibrated": len(self.calibrated),
            "blocks_resumed": len(self.resumed),
            "blocks_empty_skipped": self.skipped_empty,
            "activation_bytes": self.activation_bytes,
            "weights": self.weights.summary(self.seconds),
        }


# ---- the model, one block at a time -------------------------------------------------------------
class ModelParts:
    """A meta-device skeleton of an HF decoder model and the real pieces cut from it.

    Works for any model laid out like transformers' Llama (`model.model.layers`,
    `model.model.rotary_emb`), which builder's nemotron-nas reference model is.
    """

    def __init__(self, model_cls: type, config: Any):
        self.config = config
        with torch.device("meta"):
            self.skeleton = model_cls(config)
        recipe.register_attention(self.skeleton)

    @property
    def layers(self) -> Any:
        return self.skeleton.model.layers

    def layer(self, index: int, dtype: torch.dtype) -> torch.nn.Module:
        """A fresh copy of block `index`, still on the meta device (no memory)."""
        return copy.deepcopy(self.layers[index]).to(dtype)

    def rotary(self, device: str) -> torch.nn.Module:
        cls = type(self.skeleton.model.rotary_emb)
        with torch.device(device):
            return cls(config=self.config)

    def causal_mask(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> Any:
        """The mask the whole model would build for unpadded windows (None under sdpa)."""
        from builder.model.modeling import causal_mask

        return causal_mask(self.config, hidden, None, None, position_ids)


def load_block(
    parts: ModelParts, ckpt: HFCheckpoint, index: int, device: str, dtype: torch.dtype
) -> torch.nn.Module:
    """Block `index` with its weights read from the checkpoint in bounded row chunks."""
    layer = parts.layer(index, dtype).to_empty(device=device)
    prefix = hf_layer_prefix(index)
    with torch.no_grad():
        for name, tensor in [*layer.named_parameters(), *layer.named_buffers()]:
            _fill(tensor, ckpt, prefix + name, index)
    return layer.eval()


def _fill(target: torch.Tensor, ckpt: HFCheckpoint, source: str, index: int) -> None:
    if source not in ckpt:
        raise CheckpointError(f"{ckpt.root}: tensor {source!r} (layer {index}) is missing")
    info = ckpt.info(source)
    if tuple(info.shape) != tuple(target.shape):
        raise CheckpointError(
            f"{info.file}: tensor {source!r} has shape {list(info.shape)}, the model expects "
            f"{list(target.shape)}"
        )
    if target.dim() < 2:
        _copy_into(target, _finite(ckpt.read(source), info, index))
    else:
        step = max(1, LOAD_CHUNK_BYTES // (info.shape[1] * 4))
        for start in range(0, info.shape[0], step):
            rows = slice(start, min(start + step, info.shape[0]))
            _copy_into(target[rows], _finite(ckpt.read(source, rows=rows), info, index))


def _copy_into(target: torch.Tensor, chunk: torch.Tensor) -> None:
    """On CUDA through pinned host memory, asynchronous on the current stream (a prefetch's
    side stream; the caching host allocator keeps the pinned chunk until the copy is done)."""
    if target.is_cuda:
        target.copy_(chunk.pin_memory(), non_blocking=True)
    else:
        target.copy_(chunk)


def _finite(block: torch.Tensor, info: Any, index: int) -> torch.Tensor:
    if block.numel():
        low, high = torch.aminmax(block)
        if not (torch.isfinite(low) and torch.isfinite(high)):
            raise CheckpointError(
                f"{info.file}: tensor {info.name!r} (layer {index}) holds NaN or Inf"
            )
    return block


def embed_windows(
    ckpt: HFCheckpoint, windows: torch.Tensor, dtype: torch.dtype, device: str
) -> torch.Tensor:
    """Embeddings of `windows` reading only the embedding rows their tokens use."""
    info = ckpt.info(EMBEDDING)
    vocab, hidden = info.shape
    windows = windows.cpu()  # the rows are gathered on the host, then moved as one table
    if int(windows.max()) >= vocab or int(windows.min()) < 0:
        raise UserError(
            f"calibration token ids reach {int(windows.max())} but {EMBEDDING} has {vocab} rows "
            "(does the tokenizer belong to this checkpoint?)"
        )
    used = torch.unique(windows)
    table = torch.empty((used.numel(), hidden), dtype=dtype)
    step = max(1, LOAD_CHUNK_BYTES // (hidden * 4))
    for start in range(0, vocab, step):
        stop = min(start + step, vocab)
        inside = (used >= start) & (used < stop)
        if inside.any():
            rows = ckpt.read(EMBEDDING, rows=slice(start, stop))
            table[inside] = rows[used[inside] - start].to(dtype)
    return table[torch.searchsorted(used, windows)].to(device)


# ---- one block -----------------------------------------------------------------------------------
@dataclass
class BlockInputs:
    """What every block's forward needs besides the hidden states."""

    position_ids: torch.Tensor
    position_embeddings: Any
    attention_mask: Any


def block_inputs(parts: ModelParts, sample: torch.Tensor, device: str) -> BlockInputs:
    position_ids = torch.arange(sample.shape[1], device=device).unsqueeze(0)
    rotary = parts.rotary(device)
    with torch.no_grad():
        embeddings = rotary(sample, position_ids)
    return BlockInputs(position_ids, embeddings, parts.causal_mask(sample, position_ids))


def run_block(layer: torch.nn.Module, hidden: list[torch.Tensor], inputs: BlockInputs) -> None:
    """Replace each cached batch by the block's output (use_cache=False: no KV cache reuse)."""
    for b, states in enumerate(hidden):
        out = layer(
            states,
            attention_mask=inputs.attention_mask,
            position_ids=inputs.position_ids,
            position_embeddings=inputs.position_embeddings,
            use_cache=False,
        )
        hidden[b] = out[0] if isinstance(out, tuple) else out


def check_finite(hidden: Iterable[torch.Tensor], layer: LayerPlan, dtype: torch.dtype) -> None:
    for b, states in enumerate(hidden):
        low, high = torch.aminmax(states)
        if not (torch.isfinite(low) and torch.isfinite(high)):
            raise NonFiniteActivations(
                f"layer {layer.index}: calibration batch {b} produced NaN or Inf activations in "
                f"{str(dtype).removeprefix('torch.')} (corrupt weights, or values beyond the "
                "dtype's range)"
            )


def calibrate_block(
    layer_plan: LayerPlan,
    plan: ModelPlan,
    parts: ModelParts,
    ckpt: HFCheckpoint,
    hidden: list[torch.Tensor],
    inputs: BlockInputs,
    opts: CalibOptions,
    block: torch.nn.Module | None = None,
    store: RoundingStore | None = None,
) -> dict[str, float]:
    """ModelOpt-calibrate one block in place of `hidden`; returns its amax values.

    `block`: the block already loaded (prefetched); None loads it here. With
    `opts.rounding`, the same forward loop accumulates each unit's X^T X (max calibration
    does not fake-quantize, so these are the BF16 stream's inputs) and the block's GPTQ
    codes go into `store` (rank 0) before its amax is recorded."""
    index = layer_plan.index
    layer = block if block is not None else load_block(parts, ckpt, index, opts.device, opts.dtype)
    del block
    calls = []
    hessians: dict = {}

    def forward_loop(module: torch.nn.Module) -> None:
        if calls:  # the outputs replace the inputs, so a second pass would see wrong data
            raise AssertionError("ModelOpt ran the calibration loop twice")
        calls.append(1)
        handles = []
        if opts.rounding is not None:
            found, handles = register_hessians(
                module, layer_plan, opts.rounding.options.chunk, opts.device
            )
            hessians.update(found)
        try:
            run_block(module, hidden, inputs)
        finally:
            for handle in handles:
                handle.remove()

    recipe.quantize(layer, opts.kv_cache, forward_loop)
    check_finite(hidden, layer_plan, opts.dtype)
    values = require_amax(quantizer_amax(layer, hf_layer_prefix(index)), f"layer {index}")
    values = all_reduce_max(values, opts.device)
    missing = [k for k in expected_keys(plan, layer_plan, opts.kv_cache) if k not in values]
    if missing:
        raise AmaxError(
            f"layer {index}: ModelOpt calibrated no quantizer for {missing[0]}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + "; is the attention class wrapped for KV-cache quantization?"
        )
    if opts.rounding is not None:
        round_and_store(layer, layer_plan, hessians, values, opts.rounding, store)
    block_bytes = sum(t.numel() * t.element_size() for t in layer.parameters())
    del layer
    # ModelOpt's wrappers hold reference cycles, so the block is freed only by the cycle
    # collector. A full pass costs ~0.3 s; pay it when the block is big enough to matter.
    gc.collect(2 if block_bytes >= FULL_GC_BYTES else 1)
    if opts.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return values


def round_and_store(
    layer: torch.nn.Module,
    layer_plan: LayerPlan,
    hessians: dict,
    values: dict[str, float],
    plan: RoundingPlan,
    store: RoundingStore | None,
) -> None:
    """GPTQ codes of the block's units (H summed over the ranks), stored by rank 0."""
    from builder.quantize.rounding import round_block

    if store is None:
        raise ValueError("GPTQ rounding needs a state directory to store its codes in")
    for h in hessians.values():
        for block in h.blocks:
            all_reduce_sum(block)
    if dist_info()[0] != 0:
        return
    table = AmaxTable(values)
    codes = round_block(layer, layer_plan, hessians, plan, table.weight)
    for fmt, modules in codes.items():
        store.save(layer_plan.index, fmt, modules)


def all_reduce_sum(tensor: torch.Tensor) -> None:
    """In-place SUM over the ranks (nothing without torch.distributed)."""
    import torch.distributed as dist

    if dist_info()[1] == 1:
        return
    if dist.get_backend() == "nccl" or not tensor.is_cuda:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    else:
        host = tensor.cpu()
        dist.all_reduce(host, op=dist.ReduceOp.SUM)
        tensor.copy_(host)


# ---- data parallel -----------------------------------------------------------------------------
def dist_info() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_max(values: dict[str, float], device: str) -> dict[str, float]:
    """Element-wise MAX of the amax values over all ranks (identity without torch.distributed)."""
    import torch.distributed as dist

    if dist_info()[1] == 1:
        return values
    keys = sorted(values)
    backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    buf = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=backend_device)
    dist.all_reduce(buf, op=dist.ReduceOp.MAX)
    return dict(zip(keys, buf.cpu().tolist(), strict=True))


def rank_batches(windows: torch.Tensor, batch_size: int, rank: int, world: int) -> list:
    """This rank's share of the calibration batches: whole batches of the one-process run,
    dealt round-robin. Each batch is then computed exactly as one process would compute it
    (same rows, same shapes, so the same kernels), and ModelOpt's max calibration is a pure
    max over tokens: the MAX all-reduce of the ranks' amax is the one-process amax, bit for
    bit. (Dealing single windows instead would change the batches' shapes, and a GEMM's
    rounding may depend on its row count.)"""
    everything = batches(windows, batch_size)
    if len(everything) < world:
        raise UserError(
            f"{windows.shape[0]} calibration windows in batches of {batch_size} make "
            f"{len(everything)} batch(es), fewer than the {world} ranks; lower --batch-size "
            "or raise --calib-size"
        )
    return everything[rank::world]


def barrier() -> None:
    import torch.distributed as dist

    if dist_info()[1] > 1:
        dist.barrier()


# ---- resume state ------------------------------------------------------------------------------
class CalibState:
    """Per-block amax and the activations entering the next block, in a directory."""

    def __init__(self, directory: Path, fingerprint: dict[str, Any], rank: int):
        self.dir = Path(directory)
        self.fingerprint = fingerprint
        self.rank = rank

    @property
    def state_file(self) -> Path:
        return self.dir / "state.json"

    def inputs_file(self) -> Path:
        return self.dir / f"inputs-rank{self.rank}.safetensors"

    def amax_file(self, index: int) -> Path:
        return self.dir / "amax" / f"layer-{index:05d}.json"

    def reset(self) -> None:
        import shutil

        if self.rank == 0:
            if self.dir.exists():
                shutil.rmtree(self.dir)
            (self.dir / "amax").mkdir(parents=True)
            self._write_state(0)
        barrier()

    def _write_state(self, next_layer: int) -> None:
        state = {
            "version": STATE_VERSION,
            "fingerprint": self.fingerprint,
            "next_layer": next_layer,
        }
        _write_json(self.state_file, state)

    def restore(self, plan: ModelPlan) -> tuple[int, dict[str, float], list[torch.Tensor]] | None:
        """(next layer, amax of the blocks before it, this rank's activations) or None.

        None when there is nothing to resume or it belongs to another run (fingerprint);
        state of this run that cannot be read back is an error naming the file, because
        starting over silently could throw away hours of calibration.
        """
        if not self.state_file.is_file():
            return None
        state = self._read_json(self.state_file, STATE_SCHEMA)
        if state.get("version") != STATE_VERSION or state.get("fingerprint") != self.fingerprint:
            return None
        next_layer = min(state["next_layer"], plan.num_layers)
        if state.get("complete"):  # calibration finished; only the exports were lost
            return plan.num_layers, self._read_json(self.complete_file, AMAX_SCHEMA), []
        if next_layer == 0:
            return None
        values: dict[str, float] = {}
        for layer in plan.layers[:next_layer]:
            if not layer.is_empty:
                values.update(self._read_json(self.amax_file(layer.index), AMAX_SCHEMA))
        return next_layer, values, self._read_inputs()

    def _broken(self, path: Path, why: str) -> ResumeStateError:
        return ResumeStateError(
            f"{path}: saved calibration state is unusable ({why}); run again without --resume "
            f"to calibrate from the start (or remove {self.dir})"
        )

    def _read_json(self, path: Path, schema: Any) -> Any:
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise self._broken(path, "missing") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise self._broken(path, f"unreadable: {err}") from None
        try:
            validate(data, schema, str(path), UserError)
        except UserError as err:
            raise self._broken(path, str(err).removeprefix(f"{path}: ")) from None
        return data

    def _read_inputs(self) -> list[torch.Tensor]:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = self.inputs_file()
        try:
            saved = load_file(str(path))
        except FileNotFoundError:
            raise self._broken(path, "missing") from None
        except (SafetensorError, OSError) as err:
            raise self._broken(path, f"unreadable safetensors file: {err}") from None
        names = [f"batch.{b}" for b in range(len(saved))]
        if sorted(saved) != sorted(names):
            raise self._broken(path, f"expected tensors batch.0..batch.{len(saved) - 1}")
        return [saved[name] for name in names]

    @property
    def complete_file(self) -> Path:
        return self.dir / "amax" / "complete.json"

    def save_complete(self, values: dict[str, float], num_layers: int) -> None:
        """Mark calibration finished: a resume goes straight to the exports."""
        if self.rank == 0:
            _write_json(self.complete_file, values)
            state = {
                "version": STATE_VERSION,
                "fingerprint": self.fingerprint,
                "next_layer": num_layers,
                "complete": True,
            }
            _write_json(self.state_file, state)
        barrier()

    def save_block(self, index: int, values: dict[str, float]) -> None:
        if self.rank == 0:
            _write_json(self.amax_file(index), values)

    def save_inputs(self, next_layer: int, hidden: list[torch.Tensor]) -> None:
        from safetensors.torch import save_file

        tmp = self.inputs_file().with_suffix(".tmp")
        save_file({f"batch.{b}": h.contiguous().cpu() for b, h in enumerate(hidden)}, str(tmp))
        tmp.replace(self.inputs_file())
        barrier()
        if self.rank == 0:
            self._write_state(next_layer)


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


# ---- the loop ------------------------------------------------------------------------------------
def calibrate_blockwise(
    ckpt: HFCheckpoint,
    plan: ModelPlan,
    parts: ModelParts,
    windows: torch.Tensor,
    opts: CalibOptions,
    fingerprint: dict[str, Any] | None = None,
    progress: Callable[[int, int, LayerPlan | None], None] | None = None,
) -> CalibResult:
    """Calibrate every non-empty block of `plan`; returns the whole model's amax table.

    `progress(done, total, layer)` is called once before the first block (layer None) and
    after each calibrated block; `total` counts the non-empty blocks.
    """
    started = time.perf_counter()
    rank, world = dist_info()
    local = rank_batches(windows, opts.batch_size, rank, world)
    result = CalibResult(AmaxTable(kv_cache=opts.kv_cache))
    state = None
    if opts.state_dir is not None:
        state = CalibState(opts.state_dir, dict(fingerprint or {}, world_size=world), rank)
    restored = state.restore(plan) if (state and opts.resume) else None
    store = RoundingStore(opts.state_dir / ROUNDING_DIR) if opts.state_dir is not None else None
    if restored and opts.rounding is not None:
        done = [lay for lay in plan.layers[: restored[0]] if not lay.is_empty]
        missing = missing_layers(store, opts.rounding, done)
        if missing:
            index, fmt = missing[0]
            raise state._broken(store.path(index, fmt), "missing")
    if restored:
        first, values, hidden = restored
        hidden = [h.to(opts.device) for h in hidden]
        result.table.update(values)
        result.resumed = [lay.index for lay in plan.layers[:first] if not lay.is_empty]
    else:
        if state:
            state.reset()
        first = 0
        hidden = [embed_windows(ckpt, b, opts.dtype, opts.device) for b in local]
    result.activation_bytes = sum(h.numel() * h.element_size() for h in hidden)
    inputs = block_inputs(parts, hidden[0], opts.device) if hidden else None
    since_save, last_save = 0, time.perf_counter()
    total = sum(not lay.is_empty for lay in plan.layers)
    report = progress or (lambda done, total, layer: None)
    report(len(result.resumed), total, None)
    # Empty blocks: no weights, no forward; the activations pass through unchanged.
    todo = [layer for layer in plan.layers[first:] if not layer.is_empty]
    loads = prefetched(
        todo,
        lambda layer: load_block(parts, ckpt, layer.index, opts.device, opts.dtype),
        enabled=prefetch_by_default(opts.device) if opts.prefetch is None else opts.prefetch,
        device=opts.device,
        stats=result.weights,
    )
    t0 = time.perf_counter()
    with closing(loads):  # an error in a block waits for the pending load (no stray thread)
        for layer, loaded in loads:
            # taken inline: no reference here, so the block is freed inside calibrate_block
            values = calibrate_block(
                layer, plan, parts, ckpt, hidden, inputs, opts, loaded.take(), store
            )
            result.table.update(values)
            result.calibrated.append(layer.index)
            result.block_seconds[layer.index] = time.perf_counter() - t0
            if state:
                state.save_block(layer.index, values)
                since_save += 1
                if save_due(opts.save_every, since_save, last_save, result.activation_bytes):
                    state.save_inputs(layer.index + 1, hidden)
                    since_save, last_save = 0, time.perf_counter()
            report(len(result.resumed) + len(result.calibrated), total, layer)
            t0 = time.perf_counter()
    result.skipped_empty = len(plan.empty_layers)
    result.table.validate(plan)
    if state and result.calibrated:
        state.save_complete(result.table.values, plan.num_layers)
    result.seconds = time.perf_counter() - started
    return result


AUTO_SAVE_BYTES = 256 << 20
AUTO_SAVE_SECONDS = 300.0


def save_due(save_every: int, since_save: int, last_save: float, activation_bytes: int) -> bool:
    """Whether to save the activations now.

    An explicit `save_every` counts blocks. Auto (0): after every block while the activations
    are small, else at most every AUTO_SAVE_SECONDS (Ultra at 512 x 512 tokens holds 8 GiB of
    activations; writing them after each of 81 blocks would cost more than a lost block).
    """
    if save_every > 0:
        return since_save >= save_every
    if activation_bytes <= AUTO_SAVE_BYTES:
        return True
    return time.perf_counter() - last_save >= AUTO_SAVE_SECONDS


def calibrate_model(
    model: torch.nn.Module, windows: torch.Tensor, kv_cache: bool, batch_size: int
) -> AmaxTable:
    """Whole-model ModelOpt calibration (the reference the block-wise path must equal)."""
    device = next(model.parameters()).device

    def forward_loop(m: torch.nn.Module) -> None:
        for batch in batches(windows, batch_size):
            m(batch.to(device), use_cache=False)

    recipe.quantize(model, kv_cache, forward_loop)
    return AmaxTable(require_amax(quantizer_amax(model), "model"), kv_cache=kv_cache)

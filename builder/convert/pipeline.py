"""`convert_checkpoint`: HF nemotron-nas checkpoint -> TensorRT-LLM checkpoint, all ranks or some.

Output protocol (so nothing incomplete ever looks complete, and a crash loses one rank):

  .OUT.partial/                 staging directory beside OUT
     config.json                written first (small, deterministic)
     rank{R}.safetensors.tmp    being written; deleted if its writer fails
     rank{R}.safetensors        renamed from .tmp once complete
     ranks/rank{R}.json         entry written right after the rename: size, digest (computed
                                while writing), tensor count, layout and source fingerprint
  OUT/                          the staging directory renamed, once every rank has an entry;
     manifest.json              assembled from the entries (no second hashing pass)

`--resume` keeps a rank whose entry matches the layout and source fingerprint and whose file
re-hashes to the entry's digest; the rest are redone. `--ranks A-B` converts only those ranks
into the shared staging directory; whichever run completes the set finalizes OUT. Each rank
is owned by one writer, so several processes or hosts (on a shared filesystem) never write
the same file.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from builder.arch.plan import ModelPlan, load_plan
from builder.arch.schema import AnyValue, Integer, Number, Object, String, validate
from builder.arch.tensors import check_parallelism, stage_layers
from builder.convert.layout import RankLayout, RankTransform, output_dtype, rank_layout
from builder.convert.progress import NullProgress, ProgressSink
from builder.convert.rank_writer import RankResult, rank_metadata, write_rank_file
from builder.convert.sources import DEFAULT_BLOCK_BYTES, check_source, source_fingerprint
from builder.convert.trtllm_config import NO_QUANTIZATION, trtllm_config, write_trtllm_config
from builder.convert.workers import WorkerPool, worker_progress
from builder.errors import UserError
from builder.io.atomic import (
    atomic_dir,
    check_output_location,
    check_replaceable,
    clear_dir,
    lock_stage,
    replace_dir,
    staging_path,
)
from builder.io.checkpoint import HFCheckpoint
from builder.io.manifest import (
    DIGEST,
    MANIFEST,
    ArtifactKind,
    digest_matches,
    entry_digest,
    file_entry,
    provenance,
    write_manifest,
)
from builder.io.safetensors_stream import encode_header
from builder.io.trtllm_checkpoint import rank_file_name
from builder.units import format_ranges, gib, parse_ranges

KIND = ArtifactKind.TRTLLM_CHECKPOINT
DRY_RUN_KIND = ArtifactKind.TRTLLM_CHECKPOINT_DRY_RUN
ENTRIES = "ranks"
FINALIZE_LOCK = ".finalizing"
FINGERPRINT_METHOD = (
    "sha256 of config.json, model.safetensors.index.json, and each shard's file name, size "
    "and safetensors header (no weight bytes; mtimes excluded so copies match)"
)


# ---- request and results -----------------------------------------------------------------------
@dataclass(frozen=True)
class ConvertRequest:
    """Everything a conversion is asked to do; the CLI, quantize and the demo build one.

    Objects of the running process (the progress sink, a started worker pool) are not part
    of the request: they are keyword arguments of `convert`.
    """

    src: Path
    out: Path
    tp: int
    pp: int = 1
    dtype: str = "auto"  # auto: the checkpoint's torch_dtype
    workers: int = 1
    ranks: str | tuple[int, ...] | None = None  # '0-3,6' or indices; None: every rank
    resume: bool = False
    dry_run: bool = False
    overwrite: bool = False
    transform: RankTransform | None = None  # see builder.convert.layout (used by quantize)
    quantization: Mapping[str, Any] | None = None  # config.json's `quantization`
    check_finite: bool = True
    block_bytes: int = DEFAULT_BLOCK_BYTES
    allow_pickle: bool = False  # read pytorch_model*.bin (torch.load, weights only)

    def __post_init__(self) -> None:
        object.__setattr__(self, "src", Path(self.src))
        object.__setattr__(self, "out", Path(self.out))
        if self.ranks is not None and not isinstance(self.ranks, str):
            object.__setattr__(self, "ranks", tuple(self.ranks))
        if self.workers < 1:
            raise UserError(f"--workers must be at least 1 (got {self.workers})")


class RankState(StrEnum):
    WRITTEN = "written"  # by this run
    KEPT = "kept"  # verified from an earlier run (--resume)
    PLANNED = "planned"  # a dry run's description
    PRESENT = "present"  # another run's (--ranks), verified
    PENDING = "pending"  # not yet anywhere


@dataclass
class RankStatus:
    rank: int
    tp_rank: int
    pp_rank: int
    status: RankState
    tensors: int
    bytes: int
    seconds: float = 0.0
    digest: str | None = None  # DIGEST of the rank file


@dataclass
class ConvertSummary:
    out: Path
    tp: int
    pp: int
    dtype: str
    complete: bool
    dry_run: bool
    ranks: list[RankStatus]
    seconds: float
    source: str
    manifest: Path | None = None
    stage: Path | None = None
    largest_slice_bytes: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def written_bytes(self) -> int:
        return sum(r.bytes for r in self.ranks if r.status is RankState.WRITTEN)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["out"], data["manifest"], data["stage"] = (
            str(self.out),
            _str(self.manifest),
            _str(self.stage),
        )
        data["written_bytes"] = self.written_bytes
        return data


def _str(path: Path | None) -> str | None:
    return str(path) if path else None


# ---- rank selection ------------------------------------------------------------------------------
def parse_ranks(text: str | None, world: int) -> list[int]:
    """'0-3' / '5' / '0-1,6-7' -> rank list, each checked against the world size."""
    return parse_ranges(text, world, "--ranks") if text else list(range(world))


def resolve_dtype(dtype: str, plan: ModelPlan) -> str:
    name = plan.torch_dtype if dtype == "auto" else dtype
    output_dtype(name)  # raises for unsupported names
    return name


# ---- layout description (also the dry-run manifest) ---------------------------------------------
def layout_key(
    tp: int,
    pp: int,
    dtype: str,
    quantization: Mapping[str, Any] | None,
    transform: RankTransform | None,
) -> dict[str, Any]:
    quant = {**NO_QUANTIZATION, **(quantization or {})}  # as config.json spells it
    key = {"tp": tp, "pp": pp, "world_size": tp * pp, "dtype": dtype, "quantization": quant}
    if transform is not None:
        key["transform"] = getattr(transform, "fingerprint", type(transform).__qualname__)
    return key


def rank_description(plan: ModelPlan, tp: int, pp: int, layout: RankLayout) -> dict[str, Any]:
    specs = layout.flat_specs
    stage = stage_layers(plan, pp, layout.rank // tp)
    header = encode_header(specs, rank_metadata(layout.rank, tp, pp))
    return {
        "rank": layout.rank,
        "tp_rank": layout.rank % tp,
        "pp_rank": layout.rank // tp,
        "layers": [stage.start, stage.stop - 1],
        "file": rank_file_name(layout.rank),
        "tensors": len(specs),
        "bytes": len(header) + layout.data_bytes,  # the exact rank file size
        "data_bytes": layout.data_bytes,
        "tensor_specs": {
            s.name: {"dtype": s.code, "shape": list(s.shape), "bytes": s.nbytes} for s in specs
        },
    }


def largest_slice(layouts: Sequence[RankLayout]) -> int:
    return max((s.nbytes for lay in layouts for s in lay.flat_specs), default=0)


def write_dry_run(
    plan: ModelPlan,
    out: str | Path,
    tp: int,
    pp: int = 1,
    dtype: str = "bfloat16",
    *,
    source: str,
    fingerprint: str | None = None,
    quantization: Mapping[str, Any] | None = None,
    transform: RankTransform | None = None,
    overwrite: bool = False,
    inputs: Sequence[str | Path] = (),
) -> ConvertSummary:
    """Write OUT/manifest.json describing every rank file that would be produced; no weights."""
    started = time.perf_counter()
    check_parallelism(plan, tp, pp)
    layouts = [rank_layout(plan, tp, pp, r, output_dtype(dtype), transform) for r in range(tp * pp)]
    ranks = [rank_description(plan, tp, pp, lay) for lay in layouts]
    manifest = {
        **provenance(DRY_RUN_KIND),
        "complete": False,
        "dry_run": True,
        "source": {
            "path": source,
            "fingerprint": fingerprint,
            "fingerprint_method": FINGERPRINT_METHOD,
        },
        "layout": layout_key(tp, pp, dtype, quantization, transform),
        "totals": {
            "bytes": sum(r["bytes"] for r in ranks),
            "max_rank_bytes": max(r["bytes"] for r in ranks),
            "largest_slice_bytes": largest_slice(layouts),
            "tensors": sum(r["tensors"] for r in ranks),
        },
        "config": trtllm_config(plan, tp, pp, dtype, quantization),
        "ranks": ranks,
    }
    out = Path(out)
    with atomic_dir(out, overwrite, inputs=inputs) as stage:
        write_manifest(stage, manifest)
    statuses = [
        RankStatus(
            r["rank"], r["tp_rank"], r["pp_rank"], RankState.PLANNED, r["tensors"], r["bytes"]
        )
        for r in ranks
    ]
    return ConvertSummary(
        out,
        tp,
        pp,
        dtype,
        False,
        True,
        statuses,
        time.perf_counter() - started,
        source,
        manifest=out / MANIFEST,
        largest_slice_bytes=largest_slice(layouts),
    )


# ---- rank entries in the staging directory -----------------------------------------------------
def entry_path(stage: Path, rank: int) -> Path:
    return stage / ENTRIES / f"rank{rank}.json"


def write_entry(stage: Path, result: RankResult, key: Mapping[str, Any], fingerprint: str) -> None:
    path = entry_path(stage, result.rank)
    tmp = path.with_suffix(".json.tmp")
    record = asdict(result)
    record[DIGEST] = record.pop("digest")  # keyed by its algorithm, as in manifest.json
    tmp.write_text(
        json.dumps({**record, "layout": dict(key), "source_fingerprint": fingerprint}, indent=2)
    )
    tmp.replace(path)


# A rank's record; anything else (truncated, edited, another tool's file) means "redo the rank".
ENTRY_SCHEMA = Object(
    {
        "rank": Integer(minimum=0),
        "file": String(non_empty=True),
        "size": Integer(minimum=0),
        "blake3": String(non_empty=True),
        "sha256": String(non_empty=True),  # an entry of a run before BLAKE3
        "tensors": Integer(minimum=0),
        "seconds": Number(minimum=0),
        "layout": AnyValue(),
        "source_fingerprint": String(),
    },
    required=frozenset({"rank", "file", "size", "tensors", "layout", "source_fingerprint"}),
)


def read_entry(stage: Path, rank: int) -> dict[str, Any] | None:
    """The record of `rank`, or None if there is none or it is unreadable or malformed (the
    rank is then converted again: a record is only ever a shortcut)."""
    path = entry_path(stage, rank)
    try:
        entry = json.loads(path.read_text())
        validate(entry, ENTRY_SCHEMA, str(path), UserError)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, UserError):
        return None
    if entry["rank"] != rank or entry["file"] != rank_file_name(rank) or not entry_digest(entry):
        return None
    return entry


def entry_matches(
    entry: Mapping[str, Any] | None, stage: Path, key: Mapping[str, Any], fingerprint: str
) -> bool:
    """Cheap check: same layout and source, and a rank file of the recorded size."""
    if (
        not entry
        or entry.get("layout") != dict(key)
        or entry.get("source_fingerprint") != fingerprint
    ):
        return False
    path = stage / entry["file"]
    return path.is_file() and path.stat().st_size == entry["size"]


def _recorded_digest(entry: Mapping[str, Any]) -> str | None:
    """The entry's digest if it is a DIGEST one (an older sha256 one is recomputed at
    finalization, so one manifest never mixes algorithms)."""
    algorithm, value = entry_digest(dict(entry))
    return value if algorithm == DIGEST else None


def entry_verifies(stage: Path, entry: Mapping[str, Any]) -> bool:
    return digest_matches(stage / entry["file"], entry)


# ---- workers -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RankJob:
    src: str
    stage: str
    tp: int
    pp: int
    rank: int
    dtype: str
    transform: RankTransform | None
    check_finite: bool
    block_bytes: int
    key: dict[str, Any]
    fingerprint: str
    allow_pickle: bool = False


def run_rank_job(job: RankJob, progress=None) -> RankResult:
    """Convert one rank into the staging directory (in this process or a worker) and record
    its entry, so a rank finished while another fails is kept by --resume."""
    if progress is None:
        progress = worker_progress(job.rank)

    ckpt, plan = HFCheckpoint(job.src, allow_pickle=job.allow_pickle), load_plan(job.src)
    stage = Path(job.stage)
    tmp = stage / (rank_file_name(job.rank) + ".tmp")
    with _torch_threads(1):
        result = _write_job(job, ckpt, plan, tmp, progress)
    final = rank_file_name(job.rank)
    os.replace(tmp, stage / final)
    result = RankResult(job.rank, final, result.size, result.digest, result.tensors, result.seconds)
    write_entry(stage, result, job.key, job.fingerprint)
    return result


def _write_job(job: RankJob, ckpt: HFCheckpoint, plan: ModelPlan, tmp: Path, progress):
    return write_rank_file(
        ckpt,
        plan,
        job.tp,
        job.pp,
        job.rank,
        output_dtype(job.dtype),
        tmp,
        transform=job.transform,
        progress=progress,
        block_bytes=job.block_bytes,
        check_finite=job.check_finite,
    )


def _verify_job(stage: str, entry: dict[str, Any]) -> bool:
    return entry_verifies(Path(stage), entry)


# ---- the conversion ------------------------------------------------------------------------------
def convert(
    request: ConvertRequest,
    *,
    progress: ProgressSink | None = None,
    pool: WorkerPool | None = None,
) -> ConvertSummary:
    """Convert the HF checkpoint `request.src` to a TensorRT-LLM checkpoint in `request.out`
    (tp x pp ranks).

    Returns a summary; `summary.complete` is False when `request.ranks` left some ranks to
    other runs. `pool`: worker processes started by the caller
    (`builder.convert.workers.WorkerPool`, importable without torch, so a CLI can start them
    first); by default `request.workers` > 1 starts one here.
    """
    started = time.perf_counter()
    check_output_location(request.out, [request.src])
    with ExitStack() as stack:
        if not request.dry_run:  # (a dry run locks inside atomic_dir)
            # Exclusive for a full run; `--ranks` runs own disjoint ranks and may share it.
            lock = stack.enter_context(lock_stage(request.out, shared=request.ranks is not None))
            if pool is None and request.workers > 1:
                # Workers start while this process validates the input.
                transform = request.transform
                preload = [type(transform).__module__] if transform is not None else []
                pool = stack.enter_context(
                    WorkerPool(request.workers, inherit=[lock.fd], preload=preload)
                )
        stack.enter_context(_torch_threads(1))
        return _convert(request, pool, progress, started)


def convert_checkpoint(
    src: str | Path,
    out: str | Path,
    tp: int,
    pp: int = 1,
    dtype: str = "auto",
    *,
    progress: ProgressSink | None = None,
    pool: WorkerPool | None = None,
    **options: Any,
) -> ConvertSummary:
    """`convert(ConvertRequest(src, out, tp, pp, dtype, **options))` for scripts and tests;
    `options` are ConvertRequest's fields (an unknown one is a TypeError)."""
    request = ConvertRequest(Path(src), Path(out), tp, pp, dtype, **options)
    return convert(request, progress=progress, pool=pool)


def _convert(
    request: ConvertRequest,
    pool: WorkerPool | None,
    progress: ProgressSink | None,
    started: float,
) -> ConvertSummary:
    src, out, tp, pp, dtype = request.src, request.out, request.tp, request.pp, request.dtype
    ranks, resume, overwrite = request.ranks, request.resume, request.overwrite
    transform, quantization = request.transform, request.quantization
    check_finite, block_bytes = request.check_finite, request.block_bytes
    ckpt = HFCheckpoint(src, allow_pickle=request.allow_pickle)
    plan = load_plan(src)
    dtype = resolve_dtype(dtype, plan)
    check_parallelism(plan, tp, pp)
    check_source(ckpt, plan)
    fingerprint = source_fingerprint(ckpt)
    if request.dry_run:
        return write_dry_run(
            plan,
            out,
            tp,
            pp,
            dtype,
            source=str(src.resolve()),
            fingerprint=fingerprint,
            quantization=quantization,
            transform=transform,
            overwrite=overwrite,
            inputs=[src],
        )
    world = tp * pp
    selected = (
        parse_ranks(ranks, world) if isinstance(ranks, str) or ranks is None else sorted(set(ranks))
    )
    if any(not 0 <= r < world for r in selected):
        raise UserError(f"ranks {selected} are outside 0-{world - 1}")
    check_replaceable(out, overwrite)
    key = layout_key(tp, pp, dtype, quantization, transform)
    layouts = {
        r: rank_layout(plan, tp, pp, r, output_dtype(dtype), transform) for r in range(world)
    }
    stage = _prepare_stage(out, keep=resume or ranks is not None)
    if resume and ranks is None:  # a lone --resume run owns the stage: a lock is stale
        (stage / FINALIZE_LOCK).unlink(missing_ok=True)
    write_trtllm_config(stage, trtllm_config(plan, tp, pp, dtype, quantization))

    statuses: dict[int, RankStatus] = {}
    todo = _select_work(stage, selected, resume, key, fingerprint, pool, statuses, tp)
    _check_disk_space(stage, [layouts[r] for r in todo])
    sink = progress or NullProgress()
    jobs = [
        RankJob(
            str(src),
            str(stage),
            tp,
            pp,
            r,
            dtype,
            transform,
            check_finite,
            block_bytes,
            key,
            fingerprint,
            request.allow_pickle,
        )
        for r in todo
    ]
    with sink:
        for job in jobs:
            sink.add_rank(job.rank, layouts[job.rank].data_bytes, f"rank {job.rank}")
        try:
            for result in _run_jobs(jobs, pool, sink):
                statuses[result.rank] = RankStatus(
                    result.rank,
                    result.rank % tp,
                    result.rank // tp,
                    RankState.WRITTEN,
                    result.tensors,
                    result.size,
                    result.seconds,
                    result.digest,
                )
        except UserError as err:
            done = [
                r
                for r in range(world)
                if entry_matches(read_entry(stage, r), stage, key, fingerprint)
            ]
            if done:
                raise type(err)(
                    f"{err}\n(finished ranks {format_ranges(done)} are kept in {stage}; rerun with "
                    "--resume to keep them)"
                ) from None
            raise
    complete = _fill_other_ranks(stage, world, key, fingerprint, statuses, layouts, tp)
    summary = ConvertSummary(
        out,
        tp,
        pp,
        dtype,
        complete,
        False,
        [statuses[r] for r in range(world)],
        time.perf_counter() - started,
        str(src.resolve()),
        stage=stage,
        largest_slice_bytes=largest_slice(list(layouts.values())),
    )
    if complete and _claim_finalization(stage):
        summary.manifest = _finalize(stage, out, plan, tp, pp, layouts, summary, fingerprint, key)
        summary.stage = None
    elif complete:
        summary.notes.append(f"another run (host) is finalizing {stage} -> {out.name}")
    else:
        missing = [r.rank for r in summary.ranks if r.status is RankState.PENDING]
        summary.notes.append(
            f"{len(missing)} of {world} ranks still missing in {stage} ({format_ranges(missing)}); "
            "the run that converts the last of them writes the manifest and renames it to "
            f"{out.name}"
        )
    summary.seconds = time.perf_counter() - started
    return summary


@contextmanager
def _torch_threads(count: int):
    """Conversion is memcpy/IO bound: one intra-op thread per rank. A second OpenMP thread only
    adds barrier waits, which cost 10x on a busy machine (measured on 2 cores). Plain
    conversions never import torch; a transform that computes with it (quantize) has."""
    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _prepare_stage(out: Path, keep: bool) -> Path:
    """The locked staging directory, emptied unless its ranks are to be kept."""
    stage = staging_path(out)  # created and locked by convert_checkpoint
    if not keep:
        clear_dir(stage)
    (stage / ENTRIES).mkdir(exist_ok=True)
    return stage


def _select_work(
    stage: Path,
    selected: list[int],
    resume: bool,
    key: Mapping[str, Any],
    fingerprint: str,
    pool: WorkerPool | None,
    statuses: dict[int, RankStatus],
    tp: int,
) -> list[int]:
    """Ranks of `selected` that must be (re)written; kept ones go into `statuses`."""
    if not resume:
        return list(selected)
    candidates = {}
    for rank in selected:
        entry = read_entry(stage, rank)
        if entry_matches(entry, stage, key, fingerprint):
            candidates[rank] = entry
    if pool is None:
        verified = {rank: entry_verifies(stage, entry) for rank, entry in candidates.items()}
    else:
        futures = {
            rank: pool.executor.submit(_verify_job, str(stage), e) for rank, e in candidates.items()
        }
        verified = {rank: future.result() for rank, future in futures.items()}
    for rank, entry in candidates.items():
        if verified[rank]:
            statuses[rank] = RankStatus(
                rank,
                rank % tp,
                rank // tp,
                RankState.KEPT,
                entry["tensors"],
                entry["size"],
                0.0,
                _recorded_digest(entry),
            )
    return [r for r in selected if r not in statuses]


def _check_disk_space(stage: Path, layouts: Sequence[RankLayout]) -> None:
    need = sum(len(encode_header(lay.flat_specs)) + lay.data_bytes + 4096 for lay in layouts)
    free = shutil.disk_usage(stage).free
    if need > free:
        raise UserError(
            f"{stage}: the {len(layouts)} rank file(s) to write need {gib(need)} but only "
            f"{gib(free)} are free on that filesystem"
        )


def _run_jobs(jobs: Sequence[RankJob], pool: WorkerPool | None, sink: ProgressSink):
    """Yield each job's RankResult as it completes; the first failure stops the run."""
    if pool is None:
        for job in jobs:
            result = run_rank_job(job, progress=lambda n, r=job.rank: sink.advance(r, n))
            sink.done(job.rank, RankState.WRITTEN)
            yield result
        return
    pool.sink = sink
    pending = {pool.executor.submit(run_rank_job, job): job for job in jobs}
    while pending:
        finished, _ = wait(pending, return_when=FIRST_EXCEPTION)
        for future in finished:
            job = pending.pop(future)
            error = future.exception()
            if error is not None:
                for other in pending:
                    other.cancel()
                wait(pending)  # ranks already running finish (and record themselves) first
                if isinstance(error, BrokenProcessPool):
                    raise UserError(
                        f"rank {job.rank}: a worker process died (killed, or out of memory?)"
                    )
                raise error
            sink.done(job.rank, RankState.WRITTEN)
            yield future.result()


def _fill_other_ranks(
    stage: Path,
    world: int,
    key: Mapping[str, Any],
    fingerprint: str,
    statuses: dict[int, RankStatus],
    layouts: Mapping[int, RankLayout],
    tp: int,
) -> bool:
    """Record ranks this run did not touch (done by another run, or still pending)."""
    for rank in range(world):
        if rank in statuses:
            continue
        entry = read_entry(stage, rank)
        if entry_matches(entry, stage, key, fingerprint):
            statuses[rank] = RankStatus(
                rank,
                rank % tp,
                rank // tp,
                RankState.PRESENT,
                entry["tensors"],
                entry["size"],
                0.0,
                _recorded_digest(entry),
            )
        else:
            lay = layouts[rank]
            statuses[rank] = RankStatus(
                rank, rank % tp, rank // tp, RankState.PENDING, len(lay.flat_specs), 0
            )
    return all(s.status is not RankState.PENDING for s in statuses.values())


def _claim_finalization(stage: Path) -> bool:
    """True for exactly one of several runs that complete the set at the same time."""
    try:
        os.close(os.open(stage / FINALIZE_LOCK, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def _finalize(
    stage: Path,
    out: Path,
    plan: ModelPlan,
    tp: int,
    pp: int,
    layouts: Mapping[int, RankLayout],
    summary: ConvertSummary,
    fingerprint: str,
    key: Mapping[str, Any],
) -> Path:
    """Write manifest.json from the entries, drop staging leftovers, rename stage -> out."""
    world = tp * pp
    wanted = {"config.json"} | {rank_file_name(r) for r in range(world)}
    for path in stage.iterdir():  # leftovers: .tmp files, ranks of an earlier, larger layout
        if path.is_file() and path.name not in wanted:
            path.unlink()
    files = {"config.json": file_entry(stage / "config.json")}
    ranks = []
    for status in summary.ranks:
        name = rank_file_name(status.rank)
        files[name] = file_entry(stage / name, digest=status.digest)
        ranks.append(
            rank_description(plan, tp, pp, layouts[status.rank]) | {"bytes": files[name]["size"]}
        )
    manifest = {
        **provenance(KIND),
        "complete": True,
        "source": {
            "path": summary.source,
            "fingerprint": fingerprint,
            "fingerprint_method": FINGERPRINT_METHOD,
        },
        "layout": dict(key),
        "ranks": ranks,
        "files": files,
    }
    write_manifest(stage, manifest)
    shutil.rmtree(stage / ENTRIES)
    try:
        replace_dir(stage, out, overwrite=True)  # OUT was checked at the start of the run
    except OSError as err:
        raise UserError(
            f"{out}: cannot rename the finished staging directory {stage} ({err})"
        ) from None
    return out / MANIFEST

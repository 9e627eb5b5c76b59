"""`convert_checkpoint`: HF nemotron-nas checkpoint -> TensorRT-LLM checkpoint, all ranks or some.

Output protocol (so nothing incomplete ever looks complete, and a crash loses one rank):

  .OUT.partial/                 staging directory beside OUT
     config.json                written first (small, deterministic)
     rank{R}.safetensors.tmp    being written; deleted if its writer fails
     rank{R}.safetensors        renamed from .tmp once complete
     ranks/rank{R}.json         entry written right after the rename: size, sha256 (computed
                                while writing), tensor count, layout and source fingerprint
  OUT/                          the staging directory renamed, once every rank has an entry;
     manifest.json              assembled from the entries (no second hashing pass)

`--resume` keeps a rank whose entry matches the layout and source fingerprint and whose file
re-hashes to the entry's sha256; the rest are redone. `--ranks A-B` converts only those ranks
into the shared staging directory; whichever run completes the set finalizes OUT. Each rank
is owned by one writer, so several processes or hosts (on a shared filesystem) never write
the same file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from builder.arch.plan import ModelPlan, load_plan
from builder.arch.schema import AnyValue, Integer, Number, Object, String, validate
from builder.arch.tensors import check_parallelism, stage_layers
from builder.convert.layout import RankLayout, RankTransform, rank_layout, torch_dtype
from builder.convert.progress import NullProgress, ProgressSink
from builder.convert.rank_writer import RankResult, rank_file_name, rank_metadata, write_rank_file
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
from builder.io.manifest import MANIFEST, file_entry, provenance, sha256_file, write_manifest
from builder.io.safetensors_stream import DTYPE_CODES, encode_header

KIND = "trtllm-checkpoint"
DRY_RUN_KIND = "trtllm-checkpoint-dry-run"
ENTRIES = "ranks"
FINALIZE_LOCK = ".finalizing"
FINGERPRINT_METHOD = (
    "sha256 of config.json, model.safetensors.index.json, and each shard's file name, size "
    "and safetensors header (no weight bytes; mtimes excluded so copies match)"
)


# ---- results ------------------------------------------------------------------------------------
@dataclass
class RankStatus:
    rank: int
    tp_rank: int
    pp_rank: int
    status: str  # written | kept | planned | present (another run's) | pending (not yet anywhere)
    tensors: int
    bytes: int
    seconds: float = 0.0
    sha256: str | None = None


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
        return sum(r.bytes for r in self.ranks if r.status == "written")

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


# ---- rank selection
# -------------------------------------------------------------------------------
def parse_ranks(text: str | None, world: int) -> list[int]:
    """'0-3' / '5' / '0-1,6-7' -> rank list, each checked against the world size."""
    if not text:
        return list(range(world))
    ranks: set[int] = set()
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match:
            raise UserError(f"--ranks: cannot read {part!r} (expected e.g. 0-3 or 0-1,6-7)")
        first, last = int(match[1]), int(match[2] or match[1])
        if first > last or last >= world:
            raise UserError(
                f"--ranks: {part.strip()!r} is outside 0-{world - 1} (world size {world})"
            )
        ranks.update(range(first, last + 1))
    return sorted(ranks)


def resolve_dtype(dtype: str, plan: ModelPlan) -> str:
    name = plan.torch_dtype if dtype == "auto" else dtype
    torch_dtype(name)  # raises for unsupported names
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
            s.name: {"dtype": DTYPE_CODES[s.dtype], "shape": list(s.shape), "bytes": s.nbytes}
            for s in specs
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
    layouts = [rank_layout(plan, tp, pp, r, torch_dtype(dtype), transform) for r in range(tp * pp)]
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
        RankStatus(r["rank"], r["tp_rank"], r["pp_rank"], "planned", r["tensors"], r["bytes"])
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
    tmp.write_text(
        json.dumps(
            {**asdict(result), "layout": dict(key), "source_fingerprint": fingerprint}, indent=2
        )
    )
    tmp.replace(path)


# A rank's record; anything else (truncated, edited, another tool's file) means "redo the rank".
ENTRY_SCHEMA = Object(
    {
        "rank": Integer(minimum=0),
        "file": String(non_empty=True),
        "size": Integer(minimum=0),
        "sha256": String(non_empty=True),
        "tensors": Integer(minimum=0),
        "seconds": Number(minimum=0),
        "layout": AnyValue(),
        "source_fingerprint": String(),
    },
    required=frozenset(
        {"rank", "file", "size", "sha256", "tensors", "layout", "source_fingerprint"}
    ),
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
    if entry["rank"] != rank or entry["file"] != rank_file_name(rank):
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


def entry_verifies(stage: Path, entry: Mapping[str, Any]) -> bool:
    return sha256_file(stage / entry["file"]) == entry["sha256"]


# ---- workers
# ---------------------------------------------------------------------------------------
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
    result = write_rank_file(
        ckpt,
        plan,
        job.tp,
        job.pp,
        job.rank,
        torch_dtype(job.dtype),
        tmp,
        transform=job.transform,
        progress=progress,
        block_bytes=job.block_bytes,
        check_finite=job.check_finite,
    )
    final = rank_file_name(job.rank)
    os.replace(tmp, stage / final)
    result = RankResult(job.rank, final, result.size, result.sha256, result.tensors, result.seconds)
    write_entry(stage, result, job.key, job.fingerprint)
    return result


def _verify_job(stage: str, entry: dict[str, Any]) -> bool:
    return entry_verifies(Path(stage), entry)


# ---- the conversion ------------------------------------------------------------------------------
def convert_checkpoint(
    src: str | Path,
    out: str | Path,
    tp: int,
    pp: int = 1,
    dtype: str = "auto",
    *,
    workers: int = 1,
    ranks: str | Sequence[int] | None = None,
    resume: bool = False,
    dry_run: bool = False,
    overwrite: bool = False,
    transform: RankTransform | None = None,
    quantization: Mapping[str, Any] | None = None,
    check_finite: bool = True,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    progress: ProgressSink | None = None,
    pool: WorkerPool | None = None,
    allow_pickle: bool = False,
) -> ConvertSummary:
    """Convert the HF checkpoint `src` to a TensorRT-LLM checkpoint in `out` (tp x pp ranks).

    Returns a summary; `summary.complete` is False when `ranks` left some ranks to other runs.
    `transform`/`quantization`: see `builder.convert.layout.RankTransform` (used by quantize).
    `pool`: worker processes started by the caller (`builder.convert.workers.WorkerPool`,
    importable without torch, so a CLI can start them first); by default `workers` > 1
    starts one here. `allow_pickle`: read pytorch_model*.bin weights (torch.load with
    weights_only=True) when there are no safetensors; refused by default.
    """
    started = time.perf_counter()
    if workers < 1:
        raise UserError(f"--workers must be at least 1 (got {workers})")
    check_output_location(out, [src])
    with ExitStack() as stack:
        if not dry_run:  # (a dry run locks inside atomic_dir)
            # Exclusive for a full run; `--ranks` runs own disjoint ranks and may share it.
            lock = stack.enter_context(lock_stage(out, shared=ranks is not None))
            if pool is None and workers > 1:
                # Workers start (and import torch) while this process validates the input.
                pool = stack.enter_context(WorkerPool(workers, inherit=[lock.fd]))
        stack.enter_context(_torch_threads(1))
        return _convert(
            Path(src),
            Path(out),
            tp,
            pp,
            dtype,
            pool,
            ranks,
            resume,
            dry_run,
            overwrite,
            transform,
            quantization,
            check_finite,
            block_bytes,
            progress,
            started,
            allow_pickle,
        )


def _convert(
    src: Path,
    out: Path,
    tp: int,
    pp: int,
    dtype: str,
    pool: WorkerPool | None,
    ranks: str | Sequence[int] | None,
    resume: bool,
    dry_run: bool,
    overwrite: bool,
    transform: RankTransform | None,
    quantization: Mapping[str, Any] | None,
    check_finite: bool,
    block_bytes: int,
    progress: ProgressSink | None,
    started: float,
    allow_pickle: bool,
) -> ConvertSummary:
    ckpt = HFCheckpoint(src, allow_pickle=allow_pickle)
    plan = load_plan(src)
    dtype = resolve_dtype(dtype, plan)
    check_parallelism(plan, tp, pp)
    check_source(ckpt, plan)
    fingerprint = source_fingerprint(ckpt)
    if dry_run:
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
    layouts = {r: rank_layout(plan, tp, pp, r, torch_dtype(dtype), transform) for r in range(world)}
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
            allow_pickle,
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
                    "written",
                    result.tensors,
                    result.size,
                    result.seconds,
                    result.sha256,
                )
        except UserError as err:
            done = [
                r
                for r in range(world)
                if entry_matches(read_entry(stage, r), stage, key, fingerprint)
            ]
            if done:
                raise type(err)(
                    f"{err}\n(finished ranks {_ranges(done)} are kept in {stage}; rerun with "
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
        missing = [r.rank for r in summary.ranks if r.status == "pending"]
        summary.notes.append(
            f"{len(missing)} of {world} ranks still missing in {stage} ({_ranges(missing)}); "
            "the run that converts the last of them writes the manifest and renames it to "
            f"{out.name}"
        )
    summary.seconds = time.perf_counter() - started
    return summary


@contextmanager
def _torch_threads(count: int):
    """Conversion is memcpy/IO bound: one intra-op thread per rank. A second OpenMP thread only
    adds barrier waits, which cost 10x on a busy machine (measured on 2 cores)."""
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
                "kept",
                entry["tensors"],
                entry["size"],
                0.0,
                entry["sha256"],
            )
    return [r for r in selected if r not in statuses]


def _check_disk_space(stage: Path, layouts: Sequence[RankLayout]) -> None:
    need = sum(len(encode_header(lay.flat_specs)) + lay.data_bytes + 4096 for lay in layouts)
    free = shutil.disk_usage(stage).free
    if need > free:
        raise UserError(
            f"{stage}: the {len(layouts)} rank file(s) to write need {need / 2**30:,.2f} GiB but "
            "only "
            f"{free / 2**30:,.2f} GiB are free on that filesystem"
        )


def _run_jobs(jobs: Sequence[RankJob], pool: WorkerPool | None, sink: ProgressSink):
    """Yield each job's RankResult as it completes; the first failure stops the run."""
    if pool is None:
        for job in jobs:
            result = run_rank_job(job, progress=lambda n, r=job.rank: sink.advance(r, n))
            sink.done(job.rank, "written")
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
            sink.done(job.rank, "written")
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
                "present",
                entry["tensors"],
                entry["size"],
                0.0,
                entry["sha256"],
            )
        else:
            lay = layouts[rank]
            statuses[rank] = RankStatus(
                rank, rank % tp, rank // tp, "pending", len(lay.flat_specs), 0
            )
    return all(s.status != "pending" for s in statuses.values())


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
        files[name] = file_entry(stage / name, sha256=status.sha256)
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


def _ranges(ranks: Sequence[int]) -> str:
    parts, start = [], None
    for i, rank in enumerate(ranks):
        if start is None:
            start = rank
        if i + 1 == len(ranks) or ranks[i + 1] != rank + 1:
            parts.append(f"{start}" if start == rank else f"{start}-{rank}")
            start = None
    return ",".join(parts)

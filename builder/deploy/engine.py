"""`builder build CKPT --target T OUT`: TensorRT engines with trtllm-build, or a dry run.

The checkpoint is checked against the target (tp/pp, quantization, the manifest's sizes and
checksums) and against the plan (it must fit). The trtllm-build arguments come from the
profile and are checked against the pinned release's flag set before anything runs.

A real build needs TensorRT-LLM 1.2.x or earlier (the engine backend was removed after it):
it runs `trtllm-build` in a subprocess, streams its log to the terminal and OUT/build.log,
shows how many rank engines exist, and writes build_report.json (exact command, versions,
wall time, engine sizes) and a manifest. OUT appears only when every rank engine exists.

A dry run needs no TensorRT-LLM and writes the command (a script), the build configuration,
the plan and a report that says no engine was built. Nothing ever writes an engine file that
trtllm-build did not produce.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from builder import __version__
from builder.deploy import launch
from builder.deploy.bundle import Bundle, write_bundle
from builder.deploy.inputs import (
    InputError,
    TrtllmInput,
    check_manifest,
    is_trtllm_checkpoint,
    read_trtllm_input,
    sizes_problems,
    trtllm_mismatches,
    verify_checksums,
)
from builder.deploy.planner import TargetPlan, plan_target
from builder.deploy.profiles import TargetProfile
from builder.deploy.trtllm_flags import check_args, load_flag_set
from builder.errors import UserError
from builder.io.atomic import atomic_dir
from builder.io.manifest import ArtifactKind

ENGINE_KIND = ArtifactKind.TRTLLM_ENGINE
DRY_RUN_KIND = ArtifactKind.TRTLLM_BUILD_DRY_RUN
OLDEST = (0, 19)  # Ultra needs about 0.19 (trtllm-checkpoint.md section 0)
NEWEST = (1, 2)  # the last release line with trtllm-build and models/nemotron_nas
PINNED = "1.2.1"
INSTALL_HINT = (
    f"install the pinned release: pip install 'builder[trtllm]' (tensorrt_llm {PINNED}; the "
    "PyPI entry fetches the wheel from NVIDIA's index, https://pypi.nvidia.com; Python 3.10 or "
    "3.12, Linux, CUDA 13), or run inside the NGC container "
    f"nvcr.io/nvidia/tensorrt-llm/release:{PINNED}. "
    "Without it: `--dry-run` writes the command, or `--backend pytorch` serves the HF checkpoint"
)


class TrtllmUnavailable(UserError):
    """TensorRT-LLM is missing, or not a release with the engine backend."""


# ---- TensorRT-LLM presence and version ------------------------------------------------------
@dataclass(frozen=True)
class TrtllmStatus:
    version: str | None
    usable: bool
    reason: str


def installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _major_minor(version: str) -> tuple[int, int] | None:
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match[1]), int(match[2])) if match else None


def trtllm_status(version: str | None = None, importable: bool | None = None) -> TrtllmStatus:
    """Whether this environment can run the engine backend (no import of TensorRT-LLM)."""
    version = installed_version("tensorrt_llm") if version is None else version
    if importable is None:
        importable = importlib.util.find_spec("tensorrt_llm") is not None
    if version is None or not importable:
        return TrtllmStatus(version, False, "TensorRT-LLM is not installed")
    release = _major_minor(version)
    if release is None:
        return TrtllmStatus(version, False, f"TensorRT-LLM {version}: unrecognised version")
    if release > NEWEST:
        return TrtllmStatus(
            version,
            False,
            (
                f"TensorRT-LLM {version} is too new: the TensorRT engine backend (trtllm-build, "
                f"models/nemotron_nas) exists only up to the {NEWEST[0]}.{NEWEST[1]}.x releases"
            ),
        )
    if release < OLDEST:
        return TrtllmStatus(
            version,
            False,
            (
                f"TensorRT-LLM {version} is too old for Nemotron-Ultra (needs "
                f"{OLDEST[0]}.{OLDEST[1]} "
                f"or later; {PINNED} is the pinned release)"
            ),
        )
    return TrtllmStatus(version, True, f"TensorRT-LLM {version}")


def require_trtllm(status: TrtllmStatus | None = None) -> TrtllmStatus:
    status = status or trtllm_status()
    if not status.usable:
        raise TrtllmUnavailable(f"{status.reason}; {INSTALL_HINT}")
    return status


def versions(status: TrtllmStatus | None = None) -> dict[str, Any]:
    status = status or trtllm_status()
    return {
        "builder": __version__,
        "python": platform.python_version(),
        "tensorrt_llm": status.version,
        "tensorrt": installed_version("tensorrt"),
        "torch": installed_version("torch"),
        "pinned_tensorrt_llm": PINNED,
    }


# ---- the command ------------------------------------------------------------------------------
def _switch(value: bool) -> str:
    return "enable" if value else "disable"


def trtllm_build_args(profile: TargetProfile, checkpoint_dir: str, output_dir: str) -> list[str]:
    """trtllm-build arguments (without the program) for `profile`, checked against the pinned
    flag set. Every limit is explicit: defaults make Ultra OOM (TensorRT-LLM PR 8399)."""
    b = profile.build
    args = [
        "--checkpoint_dir",
        checkpoint_dir,
        "--output_dir",
        output_dir,
        "--max_batch_size",
        str(b.max_batch_size),
        "--max_input_len",
        str(b.max_input_len),
        "--max_seq_len",
        str(b.max_seq_len),
        "--max_num_tokens",
        str(b.max_num_tokens),
        "--kv_cache_type",
        b.kv_cache_type,
        "--tokens_per_block",
        str(b.tokens_per_block),
        "--gemm_plugin",
        b.gemm_plugin,
        "--use_fp8_context_fmha",
        _switch(b.use_fp8_context_fmha),
        "--use_paged_context_fmha",
        _switch(b.use_paged_context_fmha),
        "--use_fused_mlp",
        _switch(b.use_fused_mlp),
        "--reduce_fusion",
        _switch(b.reduce_fusion and profile.parallel.tp > 1),
        "--multiple_profiles",
        _switch(b.multiple_profiles),
        "--workers",
        str(profile.engine_workers),
        "--log_level",
        b.log_level,
    ]
    check_args(args, f"trtllm-build arguments from target {profile.name} ({profile.source})")
    return args


# ---- running ------------------------------------------------------------------------------------
def run_logged(
    command: list[str], log_path: Path, on_line: Callable[[str], None] | None = None
) -> int:
    """Run `command`, copying its merged stdout/stderr to `log_path` and `on_line` as it comes."""
    with (
        open(log_path, "w") as log,
        subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        ) as process,
    ):
        assert process.stdout is not None
        for line in process.stdout:
            log.write(line)
            log.flush()
            if on_line:
                on_line(line.rstrip("\n"))
        return process.wait()


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def trtllm_build_executable() -> list[str]:
    found = shutil.which("trtllm-build")
    return [found] if found else [sys.executable, "-m", "tensorrt_llm.commands.build"]


# ---- results -------------------------------------------------------------------------------------
@dataclass
class BuildResult:
    out: Path
    dry_run: bool
    report: dict[str, Any]
    plan: TargetPlan
    files: list[str] = field(default_factory=list)


Progress = Callable[[str, int, int], None]  # (what, done, total)


def _verify(inp: TrtllmInput, verify: bool, progress: Progress | None) -> dict[str, Any]:
    check_manifest(inp)
    manifest = inp.manifest or {}
    problems = sizes_problems(inp.root, manifest)
    if problems:
        raise InputError("; ".join(problems))
    if not verify:
        return {"sizes": "ok", "digests": "skipped (--no-verify)"}
    total = sum(int(e.get("size", 0)) for e in manifest["files"].values())
    done = 0

    def on_file(_name: str, size: int) -> None:
        nonlocal done
        done += size
        if progress:
            progress("verifying checksums", done, total)

    problems = verify_checksums(inp.root, manifest, on_file)
    if problems:
        raise InputError("checkpoint does not match its manifest: " + "; ".join(problems))
    return {"sizes": "ok", "digests": f"ok ({len(manifest['files'])} files)"}


def _check_input(checkpoint: str | Path, profile: TargetProfile) -> tuple[TrtllmInput, TargetPlan]:
    if Path(checkpoint).is_dir() and not is_trtllm_checkpoint(Path(checkpoint)):
        raise InputError(
            f"{checkpoint}: not a TensorRT-LLM checkpoint (config.json has no "
            "'architecture'/'mapping'); convert it with `builder convert`, or serve an "
            "HF checkpoint with --backend pytorch"
        )
    inp = read_trtllm_input(checkpoint)
    problems = trtllm_mismatches(inp, profile)
    if problems:
        raise InputError("checkpoint does not match the target: " + "; ".join(problems))
    return inp, plan_target(inp.plan, profile)


def _tokenizer_dir(inp: TrtllmInput) -> str:
    source = (inp.manifest or {}).get("source") or {}
    return str(source.get("path") or "/path/to/hf-checkpoint")


def engine_scripts(
    profile: TargetProfile, args: list[str], inp: TrtllmInput, engine_dir: str
) -> dict[str, str]:
    env = {"CKPT_DIR": str(inp.root.resolve()), "ENGINE_DIR": engine_dir}
    generic = list(args)
    generic[generic.index("--checkpoint_dir") + 1] = "${CKPT_DIR}"
    generic[generic.index("--output_dir") + 1] = "${ENGINE_DIR}"
    mpi = list(generic)
    mpi[mpi.index("--workers") + 1] = "1"  # one engine per MPI rank (build.py parallel_build)
    serve = [
        "trtllm-serve",
        "${ENGINE_DIR}",
        "--backend",
        "tensorrt",
        "--tokenizer",
        "${TOKENIZER_DIR}",
        "--tp_size",
        str(profile.parallel.tp),
        "--pp_size",
        str(profile.parallel.pp),
        "--kv_cache_free_gpu_memory_fraction",
        str(profile.runtime.kv_cache_free_gpu_mem_fraction),
        "--host",
        "0.0.0.0",
        "--port",
        "${PORT}",
    ]
    serve_env = {
        "ENGINE_DIR": engine_dir,
        "TOKENIZER_DIR": _tokenizer_dir(inp),
        "PORT": str(profile.runtime.port),
    }
    scripts = {
        "build-engines.sh": launch.script(
            f"trtllm-build for target {profile.name}: {profile.world_size} rank engines on one "
            "node.",
            launch.shell_join(["trtllm-build", *generic]),
            env,
        ),
        "build-engines-mpirun.sh": launch.script(
            f"trtllm-build for target {profile.name} across nodes: MPI rank r builds engine r.",
            launch.shell_join(launch.mpirun_prefix(profile) + ["trtllm-build", *mpi]),
            {"HOSTFILE": "hostfile", **env},
        ),
    }
    scripts.update(
        launch.serve_scripts(
            profile, serve, serve_env, f"trtllm-serve of the {profile.name} engines"
        )
    )
    return scripts


def _build_config(
    profile: TargetProfile, inp: TrtllmInput, args: list[str], executable: list[str]
) -> dict:
    return {
        "target": profile.to_json(),
        "checkpoint": inp.summary(),
        "trtllm_build": {
            "command": [*executable, *args],
            "flag_set": load_flag_set().provenance(),
        },
    }


def _json_text(value: Any) -> str:
    return json.dumps(value, indent=2) + "\n"


def _engine_manifest(profile: TargetProfile, inp: TrtllmInput, built: bool) -> dict[str, Any]:
    return {"target": profile.name, "checkpoint": str(inp.root.resolve()), "engine_built": built}


def dry_run_build(
    checkpoint: str | Path,
    profile: TargetProfile,
    out: str | Path,
    *,
    verify: bool = True,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> BuildResult:
    """Check CHECKPOINT against the target and write the trtllm-build command, the build
    configuration, the plan and a report to OUT; needs no TensorRT-LLM, builds nothing."""
    out = Path(out)
    inp, result_plan = _check_input(checkpoint, profile)
    verification = _verify(inp, verify, progress)
    engine_dir = str(out.resolve())  # engines belong inside OUT, as a real build writes them
    args = trtllm_build_args(profile, str(inp.root.resolve()), engine_dir)
    config = _build_config(profile, inp, args, ["trtllm-build"])
    status = trtllm_status()
    report = {
        "engine_built": False,
        "dry_run": True,
        "why": "dry run: the trtllm-build command was written, not run; no engine exists",
        "command": ["trtllm-build", *args],
        "command_line": launch.shell_join(["trtllm-build", *args]),
        "versions": versions(status),
        "tensorrt_llm_available": status.usable,
        "tensorrt_llm_status": status.reason,
        "checkpoint": inp.summary(),
        "verification": verification,
        "target": profile.name,
        "fits": result_plan.fits,
        "verdict": result_plan.verdict,
        "next": "run launch/build-engines.sh where TensorRT-LLM "
        f"{PINNED} and {profile.world_size} GPUs are available, or `builder build` without "
        "--dry-run",
    }
    command_script = launch.script(
        f"The trtllm-build command for target {profile.name} (dry run of `builder build`).",
        launch.shell_join(["trtllm-build", *args]),
    )
    bundle = Bundle(
        kind=DRY_RUN_KIND,
        plan=result_plan,
        report=report,
        scripts=engine_scripts(profile, args, inp, engine_dir),
        files={"build_config.json": _json_text(config), "trtllm-build.sh": command_script},
        executables=frozenset({"trtllm-build.sh"}),
        manifest=_engine_manifest(profile, inp, built=False),
    )
    with atomic_dir(out, overwrite) as stage:
        files = write_bundle(stage, bundle)
    return BuildResult(out, True, report, result_plan, files)


def build_engines(
    checkpoint: str | Path,
    profile: TargetProfile,
    out: str | Path,
    *,
    verify: bool = True,
    overwrite: bool = False,
    progress: Progress | None = None,
    on_log: Callable[[str], None] | None = None,
    status: TrtllmStatus | None = None,
) -> BuildResult:
    """Build the rank engines of CHECKPOINT for the target into OUT with trtllm-build."""
    out = Path(out)
    inp, result_plan = _check_input(checkpoint, profile)
    status = require_trtllm(status)  # before hours of hashing
    if not result_plan.fits:
        raise UserError(f"target {profile.name}: {result_plan.verdict}")
    verification = _verify(inp, verify, progress)
    executable = trtllm_build_executable()
    with atomic_dir(out, overwrite) as stage:
        args = trtllm_build_args(profile, str(inp.root.resolve()), str(stage))
        command = [*executable, *args]
        world = profile.world_size

        def on_line(line: str) -> None:
            if on_log:
                on_log(line)
            if progress:
                progress("rank engines", len(list(stage.glob("rank*.engine"))), world)

        started = time.time()
        code = run_logged(command, stage / "build.log", on_line)
        wall = time.time() - started
        engines = sorted(stage.glob("rank*.engine"))
        if code != 0 or len(engines) != world:
            kept = out.with_name(out.name + ".build-failed.log")
            shutil.copy(stage / "build.log", kept)
            raise UserError(
                f"trtllm-build failed (exit {code}, {len(engines)}/{world} rank engines); log kept "
                f"in {kept}; last lines:\n{_tail(stage / 'build.log')}"
            )
        report = {
            "engine_built": True,
            "dry_run": False,
            "command": command,
            "command_line": launch.shell_join(command),
            "versions": versions(status),
            "wall_seconds": round(wall, 1),
            "engines": {p.name: p.stat().st_size for p in engines},
            "engine_bytes": sum(p.stat().st_size for p in engines),
            "checkpoint": inp.summary(),
            "verification": verification,
            "target": profile.name,
            "verdict": result_plan.verdict,
        }
        bundle = Bundle(
            kind=ENGINE_KIND,
            plan=result_plan,
            report=report,
            scripts=engine_scripts(profile, args, inp, str(out.resolve())),
            files={"build_config.json": _json_text(_build_config(profile, inp, args, executable))},
            manifest=_engine_manifest(profile, inp, built=True),
        )
        files = write_bundle(stage, bundle)
    return BuildResult(out, False, report, result_plan, files)

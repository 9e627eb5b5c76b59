"""`builder build` backends by name; the CLI's `--backend` choices are BACKENDS' keys.

engine   SOURCE is a TensorRT-LLM checkpoint: trtllm-build (TensorRT-LLM <= 1.2.x) writes
         rank engines, or a dry run writes the command, configuration and plan.
pytorch  SOURCE is an HF checkpoint: trtllm-serve options for the PyTorch backend (nothing
         is compiled, so a dry run is the same bundle).
Importing this module is cheap; each backend imports its implementation when it runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from builder.registry import Registry

if TYPE_CHECKING:
    from builder.deploy.engine import BuildResult
    from builder.deploy.profiles import TargetProfile


@dataclass(frozen=True)
class BuildRequest:
    source: Path
    profile: TargetProfile
    out: Path
    dry_run: bool = False
    verify: bool = True
    overwrite: bool = False


Progress = Callable[[str, int, int], None]
Backend = Callable[..., "BuildResult"]
BACKENDS: Registry[Backend] = Registry("build backend")


@BACKENDS.register("engine")
def engine_backend(
    request: BuildRequest,
    *,
    progress: Progress | None = None,
    on_log: Callable[[str], None] | None = None,
) -> BuildResult:
    from builder.deploy.engine import build_engines, dry_run_build

    common = dict(verify=request.verify, overwrite=request.overwrite, progress=progress)
    if request.dry_run:
        return dry_run_build(request.source, request.profile, request.out, **common)
    return build_engines(request.source, request.profile, request.out, on_log=on_log, **common)


@BACKENDS.register("pytorch")
def pytorch_backend(
    request: BuildRequest,
    *,
    progress: Progress | None = None,
    on_log: Callable[[str], None] | None = None,
) -> BuildResult:
    from builder.deploy.pytorch import write_pytorch_serve

    return write_pytorch_serve(
        request.source,
        request.profile,
        request.out,
        verify=request.verify,
        overwrite=request.overwrite,
    )

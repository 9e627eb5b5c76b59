"""`manifest.json`: what produced a directory, from what, and the sha256 of every file."""

from __future__ import annotations

import hashlib
import json
import platform
import time
from enum import StrEnum
from pathlib import Path
from typing import Any

from builder import __version__
from builder.errors import UserError

MANIFEST = "manifest.json"
_CHUNK = 16 * 1024 * 1024


class ArtifactKind(StrEnum):
    """What a directory is: every manifest's `kind`, and what readers check it against."""

    HF_CHECKPOINT = "hf-checkpoint"
    HF_FP8_CHECKPOINT = "hf-fp8-checkpoint"
    TRTLLM_CHECKPOINT = "trtllm-checkpoint"
    TRTLLM_CHECKPOINT_DRY_RUN = "trtllm-checkpoint-dry-run"
    FP8_QUANTIZATION = "fp8-quantization"
    TRTLLM_ENGINE = "trtllm-engine"
    TRTLLM_BUILD_DRY_RUN = "trtllm-build-dry-run"
    TRTLLM_PYTORCH_SERVE = "trtllm-pytorch-serve"
    TRITON_REPOSITORY = "triton-model-repository"


class ManifestError(UserError):
    """A directory whose files do not match its manifest."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_entry(path: Path, sha256: str | None = None) -> dict[str, Any]:
    return {"size": path.stat().st_size, "sha256": sha256 or sha256_file(path)}


def provenance(kind: str) -> dict[str, Any]:
    """The fields every manifest starts with: kind, producing tool and version, time."""
    return {
        "kind": kind,
        "tool": {"name": "builder", "version": __version__, "python": platform.python_version()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def build_manifest(directory: Path, kind: str, **fields: Any) -> dict[str, Any]:
    """Manifest of every file under `directory` (except the manifest itself)."""
    files = {
        str(p.relative_to(directory)): file_entry(p)
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    return {**provenance(kind), **fields, "files": files}


def write_manifest(directory: Path, manifest: dict[str, Any]) -> Path:
    path = directory / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
    return path


def read_manifest(directory: Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ManifestError(f"{path}: missing (was this directory written by builder?)") from None
    except (OSError, json.JSONDecodeError) as err:
        raise ManifestError(f"{path}: unreadable ({err})") from None


def verify_files(
    directory: Path, manifest: dict[str, Any], names: list[str] | None = None
) -> list[str]:
    """Problems found re-hashing the manifest's files (all of them, or only `names`)."""
    problems = []
    for name, entry in manifest["files"].items():
        if names is not None and name not in names:
            continue
        path = Path(directory) / name
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != entry["size"]:
            problems.append(f"{path}: size {path.stat().st_size} != manifest {entry['size']}")
        elif sha256_file(path) != entry["sha256"]:
            problems.append(f"{path}: sha256 differs from the manifest")
    return problems

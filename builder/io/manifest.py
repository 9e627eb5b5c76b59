"""`manifest.json`: what produced a directory, from what, and the digest of every file.

A file entry is `{"size": bytes, "blake3": hex}`. BLAKE3 (about 7 GB/s on one core here,
against sha256's 1.9 GB/s) because hashing every byte written was the largest CPU cost of a
conversion. Manifests written before it carry `"sha256"` instead; every check reads the
algorithm from the entry (`entry_digest`), so those still verify. Every writer records and
every reader checks file digests through this module, nowhere else.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

import blake3

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


class Hasher(Protocol):
    def update(self, data: Any, /) -> Any: ...
    def hexdigest(self) -> str: ...


DIGEST = "blake3"  # the algorithm new entries record (its name is the entry's key)
# Every algorithm an entry may name; sha256: manifests written before BLAKE3.
ALGORITHMS: dict[str, Callable[[], Hasher]] = {"blake3": blake3.blake3, "sha256": hashlib.sha256}


def new_hasher(algorithm: str = DIGEST) -> Hasher:
    """An incremental hasher (`update`, `hexdigest`) for a file digest; `update` releases the
    GIL, so a writer can hash on a side thread while it copies."""
    return ALGORITHMS[algorithm]()


def file_digest(path: Path, algorithm: str = DIGEST) -> str:
    digest = new_hasher(algorithm)
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    """sha256 of a file for fingerprints others compare against sha256 (a GGUF's published
    checksum, golden identities); manifests' file entries use `file_digest`."""
    return file_digest(path, "sha256")


def file_entry(path: Path, digest: str | None = None) -> dict[str, Any]:
    """A manifest's entry for `path`; `digest`: its DIGEST, if computed while writing."""
    return {"size": path.stat().st_size, DIGEST: digest or file_digest(path)}


def entry_digest(entry: dict[str, Any]) -> tuple[str, str] | None:
    """(algorithm, hex digest) an entry records (new entries: blake3, older ones: sha256), or
    None if it records none this tool knows."""
    for algorithm in ALGORITHMS:
        value = entry.get(algorithm)
        if isinstance(value, str) and value:
            return algorithm, value
    return None


def digest_problem(path: Path, entry: dict[str, Any]) -> str | None:
    """Why the bytes of `path` are not the ones `entry` records (None if they are): its size is
    left to the caller, who reports it first and more cheaply."""
    recorded = entry_digest(entry)
    if recorded is None:
        known = " or ".join(ALGORITHMS)
        return f"{path}: the manifest's entry records no digest ({known})"
    algorithm, value = recorded
    if file_digest(path, algorithm) != value:
        return f"{path}: {algorithm} differs from the manifest"
    return None


def digest_matches(path: Path, entry: dict[str, Any]) -> bool:
    return digest_problem(path, entry) is None


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
        elif problem := digest_problem(path, entry):
            problems.append(problem)
    return problems

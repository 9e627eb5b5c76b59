"""The one writer of deployable bundles (engine build, its dry run, PyTorch-backend serving).

Every bundle holds plan.json, build_report.json, its own text files, launch/ scripts and a
manifest.json that hashes everything in the directory, including what a build step wrote
there before. Callers write into the staging directory of `atomic_dir`, so a bundle appears
only when complete.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from builder.deploy import launch
from builder.deploy.planner import TargetPlan
from builder.io.manifest import MANIFEST, build_manifest, write_manifest


@dataclass(frozen=True)
class Bundle:
    kind: str  # manifest kind
    plan: TargetPlan
    report: Mapping[str, Any]  # build_report.json
    scripts: Mapping[str, str]  # launch/NAME -> script text
    files: Mapping[str, str] = field(default_factory=dict)  # NAME -> text, beside plan.json
    executables: frozenset[str] = frozenset()  # names in `files` that are scripts
    manifest: Mapping[str, Any] = field(default_factory=dict)  # extra manifest fields


def _json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")


def write_bundle(stage: Path, bundle: Bundle) -> list[str]:
    """Writes `bundle` into `stage`; returns the sorted relative paths of its files."""
    for name, text in bundle.files.items():
        (stage / name).write_text(text)
        if name in bundle.executables:
            (stage / name).chmod(0o755)
    _json(stage / "plan.json", bundle.plan.to_dict())
    _json(stage / "build_report.json", dict(bundle.report))
    launch.write_scripts(stage / "launch", dict(bundle.scripts))
    manifest = build_manifest(stage, bundle.kind, **bundle.manifest)
    write_manifest(stage, manifest)
    return sorted([*manifest["files"], MANIFEST])

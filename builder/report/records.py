"""One versioned JSON record for every bench and verify run (documented in docs/records.md).

A record says what was measured (model, artifact and its sha256, target, runtime, device,
software versions, git commit, settings), the metrics with their repeats and spread, the
thresholds applied and the verdict. `builder verify` and `builder bench` both write it;
the SQLite history and the reports read nothing else.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from builder import __version__
from builder.errors import UserError

SCHEMA_VERSION = 1
SCHEMA_NAME = "builder.run-record"


class RecordKind(StrEnum):
    BENCH = "bench"
    VERIFY = "verify"


class Better(StrEnum):
    """Which direction of a metric is an improvement."""

    HIGHER = "higher"
    LOWER = "lower"
    NONE = "none"  # informational: never an improvement or a regression


class Verdict(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    NONE = "none"  # measured only, no thresholds applied


@dataclass(frozen=True)
class Metric:
    """One metric: the reported value (median over repeats), its unit, definition and spread.

    `repeats` holds the value of each repeat in order; `spread` is max - min over them (0 for
    a single repeat), the noise a comparison must exceed before it calls a regression.
    `better` says which direction is an improvement.
    """

    value: float
    unit: str
    definition: str
    better: Better = Better.NONE
    repeats: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "better", Better(self.better))  # a bad word is a ValueError

    @property
    def spread(self) -> float:
        return (max(self.repeats) - min(self.repeats)) if len(self.repeats) > 1 else 0.0

    @classmethod
    def from_repeats(
        cls, values: list[float], unit: str, definition: str, better: Better = Better.NONE
    ) -> Metric:
        return cls(statistics.median(values), unit, definition, better, tuple(values))

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "repeats": list(self.repeats), "spread": self.spread}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Metric:
        return cls(
            float(data["value"]),
            str(data["unit"]),
            str(data.get("definition", "")),
            Better(str(data.get("better", "none"))),
            tuple(float(v) for v in data.get("repeats", ())),
        )


@dataclass(frozen=True)
class Artifact:
    """What was measured: its path (absolute), kind (e.g. trtllm-bf16, trtllm-fp8, hf-fp8,
    server) and a sha256 fingerprint (of its manifest, or of the server's model name)."""

    path: str
    kind: str
    sha256: str


@dataclass(frozen=True)
class RunRecord:
    kind: RecordKind
    model: str
    artifact: Artifact
    runtime: str
    target: str = ""
    device: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Metric] = field(default_factory=dict)
    thresholds: dict[str, Any] = field(default_factory=dict)
    verdict: Verdict = Verdict.NONE
    details: dict[str, Any] = field(default_factory=dict)  # per-position / per-block series
    environment: dict[str, Any] = field(default_factory=lambda: current_environment())
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA_NAME,
            "schema_version": SCHEMA_VERSION,
            "kind": str(self.kind),
            "created": self.created,
            "model": self.model,
            "artifact": asdict(self.artifact),
            "runtime": self.runtime,
            "target": self.target,
            "device": self.device,
            "environment": self.environment,
            "settings": self.settings,
            "metrics": {name: m.to_json() for name, m in self.metrics.items()},
            "thresholds": self.thresholds,
            "verdict": str(self.verdict),
            "details": self.details,
        }

    @classmethod
    def from_json(cls, data: Any, source: str = "record") -> RunRecord:
        if not isinstance(data, dict) or data.get("schema") != SCHEMA_NAME:
            raise UserError(f"{source}: not a builder run record (schema {SCHEMA_NAME!r} expected)")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise UserError(
                f"{source}: schema_version {version!r}, this builder reads {SCHEMA_VERSION}"
            )
        try:
            return cls(
                kind=RecordKind(data["kind"]),
                model=str(data["model"]),
                artifact=Artifact(**data["artifact"]),
                runtime=str(data["runtime"]),
                target=str(data.get("target", "")),
                device=str(data.get("device", "")),
                settings=dict(data.get("settings", {})),
                metrics={k: Metric.from_json(v) for k, v in data.get("metrics", {}).items()},
                thresholds=dict(data.get("thresholds", {})),
                verdict=Verdict(data.get("verdict", "none")),
                details=dict(data.get("details", {})),
                environment=dict(data.get("environment", {})),
                created=str(data["created"]),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(
                f"{source}: malformed run record ({type(err).__name__}: {err})"
            ) from None


def current_environment() -> dict[str, Any]:
    """Tool and library versions, host, and the git commit of the builder checkout (if any)."""
    versions = {"builder": __version__, "python": platform.python_version()}
    for name in ("torch", "transformers", "modelopt", "tensorrt_llm"):
        module = _loaded_or_none(name)
        if module is not None:
            versions[name] = getattr(module, "__version__", "unknown")
    return {"versions": versions, "host": platform.node(), "git_commit": git_commit()}


def _loaded_or_none(name: str):
    import sys

    return sys.modules.get(name)  # never import a heavy library just to name its version


def git_commit() -> str:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
            timeout=5,
            env={**os.environ, "GIT_TERMINAL_PROMPT": "0"},
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def write_record(directory: str | Path, record: RunRecord) -> Path:
    """Writes `record` as DIRECTORY/<kind>-<created>-<n>.json (never overwriting) and returns it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stamp = record.created.replace(":", "").replace("-", "")
    for n in range(1000):
        path = directory / f"{record.kind}-{stamp}-{n}.json"
        if not path.exists():
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(record.to_json(), indent=2) + "\n")
            tmp.replace(path)
            return path
    raise UserError(f"{directory}: too many records for {stamp}")


def read_record(path: str | Path) -> RunRecord:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no such record") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: unreadable record ({err})") from None
    return RunRecord.from_json(data, source=str(path))

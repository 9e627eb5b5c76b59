"""Target profiles: one TOML file per deployment target (hardware, precision, build settings).

The shipped profiles live in the repository's top-level `engines/` directory. pyproject.toml
installs that directory as a data-only namespace package named `engines`, so a wheel
install finds the files through the import system and an editable install (what CI uses)
finds them in the checkout. A user profile is any other TOML file given by path; it may
start from a shipped one with `base = "NAME"` and change only some fields.

Every field is typed and checked; an unknown or missing field is an error that names the
field and the file. Command-line overrides use the same dotted names
(`--set build.max_batch_size=32`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import tomllib
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from builder.errors import UserError

MISSION_TARGETS = ("h100x8-bf16", "h100x4-fp8", "b100x4-fp8")
PROFILE_SUFFIX = ".toml"


class ProfileError(UserError):
    """A target profile that is missing, malformed, or asks for an unknown field."""


@dataclass(frozen=True)
class Target:
    summary: str


@dataclass(frozen=True)
class Hardware:
    gpu: str
    gpus_per_node: int
    nodes: int
    gpu_memory_gib: float
    hbm_bandwidth_tbs: float
    bf16_tflops: float
    interconnect: str
    host_memory_gib: float
    disk_read_gbs: float
    disk_write_gbs: float


@dataclass(frozen=True)
class Precision:
    weights: Literal["bf16", "fp8"]
    kv_cache: Literal["bf16", "fp8"]
    use_parallel_embedding: bool


@dataclass(frozen=True)
class Parallel:
    tp: int
    pp: int


@dataclass(frozen=True)
class BuildSettings:
    max_batch_size: int
    max_seq_len: int
    max_input_len: int
    max_num_tokens: int
    kv_cache_type: Literal["paged", "continuous"]
    tokens_per_block: int
    gemm_plugin: str
    use_fp8_context_fmha: bool
    use_paged_context_fmha: bool
    use_fused_mlp: bool
    reduce_fusion: bool
    multiple_profiles: bool
    workers: int
    log_level: str


@dataclass(frozen=True)
class Runtime:
    kv_cache_free_gpu_mem_fraction: float
    runtime_reserve_gib: float
    isl: int
    osl: int
    enable_chunked_prefill: bool
    cuda_graphs: bool
    trust_remote_code: bool
    port: int


@dataclass(frozen=True)
class QuantizeSettings:
    calib_samples: int
    calib_seq_len: int


SECTIONS: dict[str, type] = {
    "target": Target,
    "hardware": Hardware,
    "precision": Precision,
    "parallel": Parallel,
    "build": BuildSettings,
    "runtime": Runtime,
    "quantize": QuantizeSettings,
}

# Fields that must be > 0 (counts, sizes, rates) and fractions that must lie in (0, 1].
_POSITIVE = {
    "hardware": {
        "gpus_per_node",
        "nodes",
        "gpu_memory_gib",
        "hbm_bandwidth_tbs",
        "bf16_tflops",
        "host_memory_gib",
        "disk_read_gbs",
        "disk_write_gbs",
    },
    "parallel": {"tp", "pp"},
    "build": {
        "max_batch_size",
        "max_seq_len",
        "max_input_len",
        "max_num_tokens",
        "tokens_per_block",
        "workers",
    },
    "runtime": {"isl", "osl", "port"},
    "quantize": {"calib_samples", "calib_seq_len"},
}
_FRACTIONS = {("runtime", "kv_cache_free_gpu_mem_fraction")}
_NON_NEGATIVE = {("runtime", "runtime_reserve_gib")}


@dataclass(frozen=True)
class TargetProfile:
    """A validated deployment target; `source` is the file it came from."""

    name: str
    source: str
    target: Target
    hardware: Hardware
    precision: Precision
    parallel: Parallel
    build: BuildSettings
    runtime: Runtime
    quantize: QuantizeSettings
    overrides: tuple[tuple[str, Any], ...] = ()

    @property
    def world_size(self) -> int:
        return self.parallel.tp * self.parallel.pp

    @property
    def total_gpus(self) -> int:
        return self.hardware.gpus_per_node * self.hardware.nodes

    @property
    def engine_workers(self) -> int:
        """trtllm-build --workers: the profile's value, never more than there are rank engines
        (a --tp/--pp override shrinks the world without touching build.workers)."""
        return min(self.build.workers, self.world_size)

    @property
    def layout_summary(self) -> str:
        """What runs where, from the values in effect (`target.summary` predates overrides)."""
        p = self.parallel
        layout = f"TP{p.tp}" + (f" PP{p.pp}" if p.pp > 1 else "")
        gpus = (
            f"{self.world_size} of {self.total_gpus}"
            if self.world_size < self.total_gpus
            else str(self.world_size)
        )
        return (
            f"{layout}, {gpus} GPUs ({self.hardware.gpu}), {self.precision.weights.upper()} weights"
        )

    @property
    def fp8_weights(self) -> bool:
        return self.precision.weights == "fp8"

    @property
    def kv_dtype(self) -> str:
        """The KV-cache dtype name builder.arch understands."""
        return "fp8" if self.precision.kv_cache == "fp8" else "bfloat16"

    def as_dict(self) -> dict[str, Any]:
        """Plain nested dict of every field (the form TOML and JSON use)."""
        return {section: dataclasses.asdict(getattr(self, section)) for section in SECTIONS}

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "overrides": {key: value for key, value in self.overrides},
            **self.as_dict(),
        }


# ---- locating shipped profiles ---------------------------------------------------------------
def profile_dirs() -> list[Path]:
    """Directories that may hold the shipped profiles, checkout first, installed copy second."""
    dirs = [Path(__file__).resolve().parents[2] / "engines"]
    spec = importlib.util.find_spec("engines")
    if spec is not None and spec.submodule_search_locations:
        dirs.extend(Path(p) for p in spec.submodule_search_locations)
    seen: list[Path] = []
    for directory in dirs:
        if (
            directory.is_dir()
            and directory not in seen
            and any(directory.glob("*" + PROFILE_SUFFIX))
        ):
            seen.append(directory)
    return seen


def shipped_profiles() -> dict[str, Path]:
    """Name -> file of every shipped profile (the first directory that has a name wins)."""
    found: dict[str, Path] = {}
    for directory in profile_dirs():
        for path in sorted(directory.glob("*" + PROFILE_SUFFIX)):
            found.setdefault(path.stem, path)
    return found


def _locate(spec: str) -> Path:
    path = Path(spec)
    if path.suffix == PROFILE_SUFFIX or path.exists() or len(path.parts) > 1:
        if not path.is_file():
            raise ProfileError(f"{path}: target profile file not found")
        return path
    shipped = shipped_profiles()
    if spec not in shipped:
        known = ", ".join(shipped) or "none found (is engines/ installed?)"
        raise ProfileError(
            f"unknown target {spec!r}; shipped targets: {known}; or give a .toml path"
        )
    return shipped[spec]


# ---- parsing and validation -------------------------------------------------------------------
def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ProfileError(f"{path}: not valid TOML: {err}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ProfileError(f"{path}: cannot read: {err}") from None


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _known_fields(section: str) -> str:
    return ", ".join(f.name for f in dataclasses.fields(SECTIONS[section]))


def _check_value(section: str, name: str, value: Any, expected: Any, where: str) -> Any:
    key = f"{section}.{name}"
    choices = typing.get_args(expected) if typing.get_origin(expected) is Literal else None
    if choices:
        if value not in choices:
            raise ProfileError(f"{where}: {key} = {value!r}: must be one of {', '.join(choices)}")
        return value
    if expected is bool:
        ok = isinstance(value, bool)
    elif expected is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif expected is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, expected)
    if not ok:
        raise ProfileError(
            f"{where}: {key} = {value!r}: expected {getattr(expected, '__name__', expected)}"
        )
    if name in _POSITIVE.get(section, ()) and value <= 0:
        raise ProfileError(f"{where}: {key} = {value!r}: must be positive")
    if (section, name) in _FRACTIONS and not 0 < value <= 1:
        raise ProfileError(f"{where}: {key} = {value!r}: must be in (0, 1]")
    if (section, name) in _NON_NEGATIVE and value < 0:
        raise ProfileError(f"{where}: {key} = {value!r}: must not be negative")
    return value


def _check_unknown(data: Mapping[str, Any], where: str) -> None:
    for section, body in data.items():
        if section not in SECTIONS:
            raise ProfileError(
                f"{where}: unknown field {section!r}; known sections: {', '.join(SECTIONS)}"
            )
        if not isinstance(body, Mapping):
            raise ProfileError(f"{where}: [{section}] must be a table, got {body!r}")
        known = {f.name for f in dataclasses.fields(SECTIONS[section])}
        for name in body:
            if name not in known:
                raise ProfileError(
                    f"{where}: unknown field '{section}.{name}'; "
                    f"known fields of [{section}]: {_known_fields(section)}"
                )


def _merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    merged = {section: dict(body) for section, body in base.items()}
    for section, body in top.items():
        merged.setdefault(section, {}).update(body)
    return merged


def _build(name: str, source: str, data: Mapping[str, Any], overrides: tuple) -> TargetProfile:
    parts: dict[str, Any] = {}
    for section, cls in SECTIONS.items():
        body = data.get(section, {})
        types = _field_types(cls)
        values = {}
        for f in dataclasses.fields(cls):
            if f.name not in body:
                raise ProfileError(f"{source}: required field '{section}.{f.name}' is missing")
            values[f.name] = _check_value(section, f.name, body[f.name], types[f.name], source)
        parts[section] = cls(**values)
    profile = TargetProfile(name=name, source=source, overrides=overrides, **parts)
    _check_consistency(profile)
    return profile


def _check_consistency(profile: TargetProfile) -> None:
    b, where = profile.build, profile.source
    if b.max_input_len > b.max_seq_len:
        raise ProfileError(
            f"{where}: build.max_input_len {b.max_input_len} exceeds build.max_seq_len "
            f"{b.max_seq_len}"
        )
    if profile.world_size > profile.total_gpus:
        raise ProfileError(
            f"{where}: parallel.tp x parallel.pp = {profile.world_size} ranks but the hardware has "
            f"{profile.total_gpus} GPUs (hardware.gpus_per_node x hardware.nodes)"
        )
    if b.use_fp8_context_fmha and profile.precision.kv_cache != "fp8":
        raise ProfileError(f'{where}: build.use_fp8_context_fmha needs precision.kv_cache = "fp8"')


def _raw_profile(spec: str, chain: tuple[str, ...] = ()) -> tuple[str, Path, dict[str, Any]]:
    path = _locate(spec)
    if str(path) in chain:
        raise ProfileError(f"{path}: 'base' chain loops: {' -> '.join(chain + (str(path),))}")
    data = _read_toml(path)
    base = data.pop("base", None)
    _check_unknown(data, str(path))
    if base is None:
        return path.stem, path, data
    if not isinstance(base, str):
        raise ProfileError(f"{path}: base = {base!r}: must be a target name or path")
    _, _, base_data = _raw_profile(base, chain + (str(path),))
    return path.stem, path, _merge(base_data, data)


def parse_override(text: str) -> tuple[str, Any]:
    """'build.max_batch_size=32' -> ('build.max_batch_size', 32); values are TOML literals."""
    key, sep, raw = text.partition("=")
    key, raw = key.strip(), raw.strip()
    if not sep or "." not in key or not raw:
        raise ProfileError(
            f"--set {text!r}: expected SECTION.FIELD=VALUE, e.g. build.max_batch_size=32"
        )
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word such as fp8 is a string
    return key, value


def _apply(data: dict[str, Any], overrides: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    data = {section: dict(body) for section, body in data.items()}
    for key, value in overrides:
        section, _, name = key.partition(".")
        if section not in SECTIONS or name not in {
            f.name for f in dataclasses.fields(SECTIONS[section])
        }:
            known = _known_fields(section) if section in SECTIONS else ", ".join(SECTIONS)
            raise ProfileError(f"--set {key}: unknown field; known: {known}")
        data.setdefault(section, {})[name] = value
    return data


def _world(data: Mapping[str, Any]) -> Any:
    parallel = data.get("parallel", {})
    return (parallel.get("tp"), parallel.get("pp"))


def _carry_workers(
    before: dict[str, Any], after: dict[str, Any], overrides: tuple
) -> dict[str, Any]:
    """A profile that builds one engine per rank (build.workers = tp x pp) keeps doing so when
    --tp/--pp change the world and build.workers is not overridden itself."""
    keys = {key for key, _ in overrides}
    tp, pp = _world(before)
    workers = before.get("build", {}).get("workers")
    if (
        "build.workers" in keys
        or _world(after) == (tp, pp)
        or not all(isinstance(v, int) for v in (tp, pp, workers))
        or workers != tp * pp
    ):
        return after
    new_tp, new_pp = _world(after)
    if isinstance(new_tp, int) and isinstance(new_pp, int):
        after["build"]["workers"] = new_tp * new_pp
    return after


def load_profile(spec: str, overrides: Iterable[tuple[str, Any]] = ()) -> TargetProfile:
    """A shipped target by name, or a user profile by path, with command-line overrides."""
    overrides = tuple(overrides)
    name, path, data = _raw_profile(spec)
    return _build(
        name, str(path), _carry_workers(data, _apply(data, overrides), overrides), overrides
    )


def with_overrides(profile: TargetProfile, overrides: Iterable[tuple[str, Any]]) -> TargetProfile:
    """The same profile with some fields replaced (checked like the file's own values)."""
    overrides = tuple(overrides)
    data = _carry_workers(profile.as_dict(), _apply(profile.as_dict(), overrides), overrides)
    return _build(profile.name, profile.source, data, profile.overrides + overrides)

"""What `builder build` recorded, read through one function: `read_build_record(BUILD_DIR)`.

Three inputs are accepted:
- an engine directory written by trtllm-build (`config.json` with `pretrained_config` and
  `build_config`; `builder build` adds its manifest and build_config.json);
- the `--dry-run` record of `builder build` (build_config.json: the target profile and the
  trtllm-build command, whose `--output_dir` is where the engine will be);
- the `--backend pytorch` bundle (build_report.json with the LLM-API options).
Everything the repository generator needs is copied into a frozen `BuildRecord`, so a change
of build's output layout touches only this module.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from builder.errors import UserError

ENGINE, PYTORCH = "engine", "pytorch"
DRY_RUN_KIND, ENGINE_KIND, PYTORCH_KIND = (
    "trtllm-build-dry-run",
    "trtllm-engine",
    "trtllm-pytorch-serve",
)


class RecordError(UserError):
    """A BUILD_DIR that is not something `builder build` (or trtllm-build) wrote."""


@dataclass(frozen=True)
class BuildRecord:
    backend: Literal["engine", "pytorch"]
    source: Path  # BUILD_DIR
    tp: int
    pp: int
    max_batch_size: int
    max_input_len: int
    max_seq_len: int
    max_num_tokens: int
    max_beam_width: int = 1
    tokens_per_block: int = 32
    paged_kv_cache: bool = True
    logits_dtype: str = "float32"
    engine_dir: Path | None = None  # engines: where config.json and rank<N>.engine are (or will be)
    engine_built: bool = False
    model_dir: Path | None = None  # PyTorch backend: the HF checkpoint it loads
    llm_api_options: dict[str, Any] = field(default_factory=dict)
    target: str = ""
    gpus_per_node: int = 8
    kv_cache_free_gpu_mem_fraction: float = 0.9
    enable_chunked_context: bool = False
    # KV tokens per rank the plan found at kv_cache_free_gpu_mem_fraction (None: no plan)
    planned_kv_tokens: int | None = None

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    def kv_tokens_at(self, fraction: float) -> int | None:
        """Tokens the paged KV cache holds per rank at `fraction` (the pool scales with it)."""
        if self.planned_kv_tokens is None or self.kv_cache_free_gpu_mem_fraction <= 0:
            return None
        return int(self.planned_kv_tokens * fraction / self.kv_cache_free_gpu_mem_fraction)

    def to_json(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise RecordError(f"{path}: missing") from None
    except (OSError, json.JSONDecodeError) as err:
        raise RecordError(f"{path}: unreadable ({err})") from None
    if not isinstance(data, dict):
        raise RecordError(f"{path}: expected a JSON object")
    return data


def _get(data: dict[str, Any], dotted: str, where: Path) -> Any:
    value: Any = data
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise RecordError(f"{where}: field {dotted} missing")
        value = value[part]
    return value


def _plan_fields(build_dir: Path) -> dict[str, Any]:
    path = build_dir / "plan.json"
    if not path.is_file():
        return {}
    plan = _json(path)
    target = plan.get("target") or {}
    runtime, hardware = target.get("runtime") or {}, target.get("hardware") or {}
    fields: dict[str, Any] = {"planned_kv_tokens": plan.get("kv_tokens_per_rank")}
    if "kv_cache_free_gpu_mem_fraction" in runtime:
        fields["kv_cache_free_gpu_mem_fraction"] = float(runtime["kv_cache_free_gpu_mem_fraction"])
    if "enable_chunked_prefill" in runtime:
        fields["enable_chunked_context"] = bool(runtime["enable_chunked_prefill"])
    if "gpus_per_node" in hardware:
        fields["gpus_per_node"] = int(hardware["gpus_per_node"])
    if target.get("name"):
        fields["target"] = target["name"]
    return fields


def _profile_fields(target: dict[str, Any], where: Path) -> dict[str, Any]:
    build = _get(target, "build", where)
    return {
        "tp": int(_get(target, "parallel.tp", where)),
        "pp": int(_get(target, "parallel.pp", where)),
        "max_batch_size": int(build["max_batch_size"]),
        "max_input_len": int(build["max_input_len"]),
        "max_seq_len": int(build["max_seq_len"]),
        "max_num_tokens": int(build["max_num_tokens"]),
        "tokens_per_block": int(build.get("tokens_per_block", 32)),
        "paged_kv_cache": build.get("kv_cache_type", "paged") == "paged",
        "target": str(target.get("name", "")),
        "gpus_per_node": int(_get(target, "hardware.gpus_per_node", where)),
        "kv_cache_free_gpu_mem_fraction": float(
            _get(target, "runtime.kv_cache_free_gpu_mem_fraction", where)
        ),
        "enable_chunked_context": bool(_get(target, "runtime.enable_chunked_prefill", where)),
    }


# Runtime choices of the target profile; the engine's own config.json wins for everything else.
PROFILE_ONLY = (
    "target",
    "gpus_per_node",
    "kv_cache_free_gpu_mem_fraction",
    "enable_chunked_context",
)


def _engine_config_fields(engine_dir: Path) -> dict[str, Any]:
    """What trtllm-build wrote in the engine's config.json."""
    path = engine_dir / "config.json"
    config = _json(path)
    pretrained = _get(config, "pretrained_config", path)
    build = _get(config, "build_config", path)
    mapping = _get(pretrained, "mapping", path)
    plugins = build.get("plugin_config") or {}
    return {
        "tp": int(mapping.get("tp_size", 1)),
        "pp": int(mapping.get("pp_size", 1)),
        "max_batch_size": int(_get(build, "max_batch_size", path)),
        "max_input_len": int(_get(build, "max_input_len", path)),
        "max_seq_len": int(_get(build, "max_seq_len", path)),
        "max_num_tokens": int(build.get("max_num_tokens") or _get(build, "max_seq_len", path)),
        "max_beam_width": int(build.get("max_beam_width", 1)),
        "tokens_per_block": int(plugins.get("tokens_per_block", 32)),
        "paged_kv_cache": bool(plugins.get("paged_kv_cache", True)),
        "logits_dtype": str(pretrained.get("logits_dtype", "float32")),
        "engine_dir": engine_dir.resolve(),
        "engine_built": any(engine_dir.glob("rank*.engine")),
    }


def _dry_run_fields(build_dir: Path) -> dict[str, Any]:
    path = build_dir / "build_config.json"
    config = _json(path)
    fields = _profile_fields(_get(config, "target", path), path)
    command = list(_get(config, "trtllm_build.command", path))
    if "--output_dir" not in command:
        raise RecordError(f"{path}: trtllm_build.command has no --output_dir")
    fields["engine_dir"] = Path(command[command.index("--output_dir") + 1]).resolve()
    checkpoint = (config.get("checkpoint") or {}).get("path")
    if checkpoint and (Path(checkpoint) / "config.json").is_file():
        fields["logits_dtype"] = str(
            _json(Path(checkpoint) / "config.json").get("logits_dtype", "float32")
        )
    return fields


def _pytorch_fields(build_dir: Path) -> dict[str, Any]:
    path = build_dir / "build_report.json"
    report = _json(path)
    options = dict(_get(report, "options", path))
    return {
        "tp": int(options.get("tensor_parallel_size", 1)),
        "pp": int(options.get("pipeline_parallel_size", 1)),
        "max_batch_size": int(_get(options, "max_batch_size", path)),
        "max_input_len": int(_get(options, "max_seq_len", path)),
        "max_seq_len": int(_get(options, "max_seq_len", path)),
        "max_num_tokens": int(_get(options, "max_num_tokens", path)),
        "tokens_per_block": int((options.get("kv_cache_config") or {}).get("tokens_per_block", 32)),
        "model_dir": Path(_get(report, "model.path", path)).resolve(),
        "llm_api_options": options,
    }


def read_build_record(build_dir: str | Path) -> BuildRecord:
    """The BuildRecord of BUILD_DIR (see the module docstring for what is accepted)."""
    build_dir = Path(build_dir)
    if not build_dir.is_dir():
        raise RecordError(f"{build_dir}: not a directory")
    manifest = _json(build_dir / "manifest.json") if (build_dir / "manifest.json").is_file() else {}
    kind = manifest.get("kind")
    config_json = build_dir / "config.json"
    if kind == PYTORCH_KIND:
        fields = _pytorch_fields(build_dir)
        backend = PYTORCH
    elif kind == DRY_RUN_KIND:
        fields = _dry_run_fields(build_dir)
        backend = ENGINE
    elif config_json.is_file() and "build_config" in _json(config_json):
        fields = _engine_config_fields(build_dir)
        ours = build_dir / "build_config.json"  # written beside the engines by `builder build`
        if ours.is_file() and "target" in _json(ours):
            profile = _profile_fields(_json(ours)["target"], ours)
            fields = {**{k: profile[k] for k in PROFILE_ONLY}, **fields}
        backend = ENGINE
    else:
        raise RecordError(
            f"{build_dir}: not a build (expected the output of `builder build` — an engine "
            "directory "
            "with config.json, a --dry-run record or a --backend pytorch bundle)"
        )
    plan = _plan_fields(build_dir)
    return BuildRecord(backend=backend, source=build_dir.resolve(), **{**plan, **fields})

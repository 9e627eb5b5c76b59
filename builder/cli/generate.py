"""`builder generate`: prompt the native reference model of a checkpoint.

Registered from builder/cli/smollm2.py until builder/cli/__init__.py imports this module.
"""

from __future__ import annotations

import click

from builder.cli.app import main
from builder.dtypes import COMPUTE

DTYPES = ("float32", *(d for d in COMPUTE if d != "float32"))  # float32 first: the default


@main.command()
@click.argument("checkpoint", type=click.Path(file_okay=False))
@click.option("--prompt", default="What is the capital of France?", show_default=True)
@click.option(
    "--reasoning/--no-reasoning",
    default=False,
    show_default=True,
    help="System prompt 'detailed thinking on/off' and its sampling defaults "
    "(on: temperature 0.6, top_p 0.95; off: greedy).",
)
@click.option("--max-new-tokens", type=click.IntRange(1), default=32, show_default=True)
@click.option("--dtype", type=click.Choice(DTYPES), default="float32", show_default=True)
@click.option(
    "--allow-pickle",
    is_flag=True,
    help="Accept pytorch_model*.bin / *.pt weights. Unpickling can run code: only for files "
    "you trust.",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def generate(checkpoint, prompt, reasoning, max_new_tokens, dtype, allow_pickle, as_json) -> None:
    """Answer PROMPT with the native PyTorch reference model of CHECKPOINT (CPU).

    CHECKPOINT is an HF nemotron-nas directory with a tokenizer and chat template. It is
    checked first (index, shards, config, every tensor name and shape); pickle weights are
    refused unless --allow-pickle. Remote code named in config.json is never run.
    """
    import time

    import torch
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from builder.cli.common import echo_json
    from builder.errors import UserError
    from builder.model import generate_text, load_reference_model
    from builder.synth import has_random_weights

    hf_logging.disable_progress_bar()  # transformers' "Loading weights" bar is not our output

    random_weights = has_random_weights(checkpoint)
    if random_weights and not as_json:
        click.secho(
            f"warning: {checkpoint} is a `builder synth` checkpoint: its weights are random "
            "(seeded), so the reply is noise, not a model's answer",
            err=True,
            fg="yellow",
        )
    model = load_reference_model(checkpoint, dtype=getattr(torch, dtype), allow_pickle=allow_pickle)
    try:
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    except (OSError, ValueError) as err:
        raise UserError(f"{checkpoint}: no usable tokenizer ({err})") from None
    if not tokenizer.chat_template:
        raise UserError(f"{checkpoint}: the tokenizer has no chat template (chat_template.jinja)")
    start = time.perf_counter()
    reply = generate_text(
        model, tokenizer, prompt, reasoning=reasoning, max_new_tokens=max_new_tokens
    )
    seconds = time.perf_counter() - start
    if as_json:
        echo_json(
            {
                "checkpoint": checkpoint,
                "prompt": prompt,
                "reasoning": reasoning,
                "reply": reply,
                "random_weights": random_weights,
                "seconds": round(seconds, 3),
            }
        )
    else:
        click.echo(printable(reply))


def printable(text: str) -> str:
    """The reply as text: control and other unprintable characters (which random weights
    produce) are shown escaped, like `\\x07`, instead of being sent raw to the terminal."""
    return "".join(
        c if c.isprintable() or c in "\n\t" else c.encode("unicode_escape").decode("ascii")
        for c in text
    )

"""The Click group every command registers on, and the user-error policy."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Mapping

import click

from builder import __version__
from builder.errors import UserError, os_error_message

PIPELINE_HELP = """\
builder: Llama-3.1-Nemotron-Ultra-253B (nemotron-nas / DeciLM) from its Hugging Face
checkpoint to deployable, verified TensorRT-LLM artifacts.

\b
Pipeline, each stage checking its input's manifest before it spends hours:
  info      per-layer plan of a checkpoint or preset (kinds, KV heads, widths, sizes)
  convert   HF checkpoint -> TensorRT-LLM checkpoint (BF16, any TP/PP), streamed
  check     verify a produced checkpoint against its manifest and the plan
  quantize  ModelOpt calibration, block by block -> TensorRT-LLM + unified HF checkpoints:
            FP8, or per-layer recipes (FP8, per-channel FP8, W8A16, BF16; --recipe auto)
  plan      memory / KV-cache / disk plan for a target (8xH100 BF16, 4xH100 FP8, ...)
  build     trtllm-build (engine releases <= 1.2.x) or PyTorch-backend serve options
  triton    Triton Inference Server model repositories of a build, and their check
Checking the artifacts:
  reference the BF16 golden: top-k log-probs, greedy continuations, per-block states
  verify    an artifact against the golden on any runtime, with the fault located
  bench     throughput and latency of a checkpoint or server -> run records (JSON)
  report    Markdown / HTML / plots of run records; `report compare` gates regressions
Test models: `synth` writes seeded checkpoints with the real block patterns scaled down,
`import-smollm2` writes the real SmolLM2-135M as a nemotron-nas checkpoint.
`demo` runs the whole pipeline on small built-in models.
"""


# Command name -> the module that defines it (and registers it on `main` when imported).
# Imported on first use, so `builder convert` does not pay for importing `build`'s or
# `bench`'s dependencies (a tenth of a second of its start-up).
COMMANDS: dict[str, str] = {
    name: f"builder.cli.{module}"
    for name, module in {
        "bench": "bench",
        "build": "build",
        "check": "check",
        "convert": "convert",
        "demo": "demo",
        "generate": "generate",
        "import-smollm2": "smollm2",
        "info": "info",
        "plan": "plan",
        "quantize": "quantize",
        "reference": "reference",
        "report": "report",
        "synth": "synth",
        "triton": "triton",
        "verify": "verify",
    }.items()
}


class BuilderGroup(click.Group):
    """Turns UserError into one clear line on stderr and exit code 2, no traceback.

    An OSError that reaches here (read-only filesystem, permission denied, disk full, a path
    that vanished) is the environment's, not a bug: it too becomes one line naming the path.
    Every other exception is a bug in builder and keeps its traceback.

    `lazy`: commands by name whose modules are imported only when the command is looked up.
    """

    def __init__(self, *args, lazy: Mapping[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *self.lazy})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.commands and name in self.lazy:
            importlib.import_module(self.lazy[name])  # its decorators register it here
        return super().get_command(ctx, name)

    def main(self, *args, **kwargs):
        """Click's own usage errors (unknown option, bad choice, missing argument, a path that
        does not exist) are bad input too: one `error:` line naming the command, exit 2,
        instead of click's usage block."""
        if not kwargs.get("standalone_mode", True):
            return super().main(*args, **kwargs)
        try:
            code = super().main(*args, **{**kwargs, "standalone_mode": False})
        except click.exceptions.NoArgsIsHelpError as err:  # `builder` alone: the overview
            click.echo(err.ctx.get_help())
            sys.exit(2)
        except click.UsageError as err:
            command = err.ctx.command_path if err.ctx else "builder"
            message = err.format_message().replace("\n", " ")
            click.secho(f"error: {command}: {message} (see `{command} --help`)", err=True, fg="red")
            sys.exit(2)
        except click.ClickException as err:
            click.secho(f"error: {err.format_message()}", err=True, fg="red")
            sys.exit(err.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as err:
            click.secho(f"error: {err}", err=True, fg="red")
            ctx.exit(2)
        except OSError as err:
            click.secho(f"error: {os_error_message(err)}", err=True, fg="red")
            ctx.exit(2)


@click.group(cls=BuilderGroup, help=PIPELINE_HELP, lazy=COMMANDS)
@click.version_option(__version__, prog_name="builder")
def main() -> None:
    pass

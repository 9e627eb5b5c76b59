"""What a new user trips over: shard modes, per-rank shapes in `info`, `generate` on random
weights, Hugging Face progress bars in command output, absolute source paths in manifests."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from builder.cli import main
from builder.cli.generate import printable


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def modes(directory: Path) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in directory.iterdir() if p.is_file()}


def test_synth_and_import_write_every_file_0644(mixed_ckpt, smollm2_ckpt):
    for directory in (mixed_ckpt, smollm2_ckpt):
        found = modes(directory)
        assert any(name.endswith(".safetensors") for name in found)
        assert {name: mode for name, mode in found.items() if mode != 0o644} == {}, directory


def test_info_tp_prints_per_rank_shapes_in_the_human_output():
    result = run("info", "--preset", "mixed", "--tp", "2", "--pp", "2", "--no-layers")
    assert result.exit_code == 0, result.output
    assert "Tensor shapes of ranks 0-1 (tp=2 pp=2)" in result.output
    assert "Tensor shapes of ranks 2-3 (tp=2 pp=2)" in result.output
    data = json.loads(run("info", "--preset", "mixed", "--tp", "2", "--pp", "2", "--json").output)
    for name, shape in data["parallel"]["ranks"][0]["shapes"].items():
        row = next(line for line in result.output.splitlines() if f" {name} " in line)
        assert "[" + ", ".join(f"{n:,}" for n in shape) + "]" in row


def test_generate_on_synth_warns_random_weights_and_no_hf_bar(mixed_ckpt):
    """Through the installed entry point: the warning on stderr, no transformers bar anywhere,
    the reply printable."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    env.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "builder",
            "generate",
            str(mixed_ckpt),
            "--prompt",
            "Hi",
            "--max-new-tokens",
            "8",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "weights are random" in done.stderr
    assert "Loading weights" not in done.stderr + done.stdout
    assert done.stdout.strip() and done.stdout.rstrip("\n").isprintable()


def test_generate_json_flags_random_weights(mixed_ckpt, tmp_path):
    synthetic = json.loads(run("generate", mixed_ckpt, "--max-new-tokens", "2", "--json").stdout)
    assert synthetic["random_weights"] is True
    other = tmp_path / "not-synth"
    shutil.copytree(mixed_ckpt, other)
    (other / "manifest.json").unlink()  # no manifest: nothing says the weights are random
    plain = run("generate", other, "--max-new-tokens", "2")
    assert plain.exit_code == 0 and "weights are random" not in plain.output


def test_printable_escapes_control_characters():
    assert printable("Paris\n\x07\x1b[2J ok") == "Paris\n\\x07\\x1b[2J ok"


def test_convert_manifest_records_the_absolute_source(mixed_ckpt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "src").symlink_to(mixed_ckpt)
    result = run("convert", "src", "out", "--tp", "1", "--json")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["source"]["path"] == str(mixed_ckpt.resolve())

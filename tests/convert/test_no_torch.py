"""A BF16/FP32 conversion and its `check` import neither torch nor transformers (issue 15):
they are byte slicing, and importing torch costs seconds per process. Each command runs in
a fresh interpreter (its fork server and workers too) whose import system refuses those
packages and records every attempt, so an import anywhere on the path, even one caught by
an `except ImportError`, fails the test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "safetensors", "modelopt")

GUARD = f"""
import os, sys

class RefuseHeavyImports:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {HEAVY!r}:
            with open(os.environ["IMPORT_LOG"], "a") as log:
                log.write(f"{{os.getpid()}} {{name}}\\n")
            raise ImportError(f"{{name}} is refused on this path (test_no_torch)")
        return None

sys.meta_path.insert(0, RefuseHeavyImports())
"""


@pytest.fixture
def guarded(tmp_path):
    """run(*args) -> CompletedProcess of `python -m builder ARGS` under the import guard."""
    hook = tmp_path / "guard"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(GUARD)
    log = tmp_path / "imports.log"

    def run(*args: str) -> subprocess.CompletedProcess:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(hook), str(ROOT)]),
            "IMPORT_LOG": str(log),
        }
        result = subprocess.run(
            [sys.executable, "-m", "builder", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        attempts = log.read_text() if log.exists() else ""
        assert not attempts, f"`builder {' '.join(args)}` imported: {attempts}{result.stderr}"
        return result

    return run


@pytest.mark.parametrize("fixture", ["mixed_ckpt", "mixed_ckpt_fp32"])
def test_convert_and_check_import_no_torch(guarded, tmp_path, request, fixture):
    src = request.getfixturevalue(fixture)
    out = tmp_path / "out"
    result = guarded("convert", str(src), str(out), "--tp", "2", "--workers", "2", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["complete"] is True
    one = guarded("convert", str(src), str(tmp_path / "one"), "--tp", "2", "--json")
    assert one.returncode == 0, one.stderr
    for rank in (0, 1):  # the in-process path writes the same bytes as the workers
        name = f"rank{rank}.safetensors"
        assert (out / name).read_bytes() == (tmp_path / "one" / name).read_bytes()
    checked = guarded("check", str(out), "--source", str(src), "--json")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert json.loads(checked.stdout)["finite_checked"] is True
    assert guarded("check", str(src)).returncode == 0


def test_help_info_plan_and_errors_import_no_torch(guarded, mixed_ckpt, tmp_path):
    assert "Pipeline" in guarded("--help").stdout
    assert guarded("convert", "--help").returncode == 0
    assert guarded("info", str(mixed_ckpt)).returncode == 0
    assert guarded("plan", "--preset", "ultra-253b", "--json").returncode in (0, 1)
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"default": "fp8-pc-pt", "overrides": {"0.qkv": "bf16"}}))
    planned = guarded(
        "plan",
        "--preset",
        "ultra-253b",
        "--target",
        "h100x4-fp8",
        "--recipe",
        str(recipe),
        "--json",
    )
    assert planned.returncode in (0, 1), planned.stderr
    (target,) = json.loads(planned.stdout)["plans"]
    assert target["recipe_memory"]["recipe"]["default"] == "fp8-pc-pt"
    missing = guarded("convert", str(tmp_path / "absent"), str(tmp_path / "out"), "--tp", "1")
    assert missing.returncode == 2 and "not a directory" in missing.stderr
    assert "Traceback" not in missing.stderr
    dry = guarded("convert", str(mixed_ckpt), str(tmp_path / "dry"), "--tp", "2", "--dry-run")
    assert dry.returncode == 0, dry.stderr

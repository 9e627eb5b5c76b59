"""builder installed from its wheel (not editable, not the checkout) plans and quantizes.

The wheel is built from a copy of the sources (building in place would write build/ and
*.egg-info into the checkout), installed without dependencies into a fresh venv that sees
this environment's packages through a .pth line, and run from a directory outside the
checkout, so target profiles and the built-in calibration set can only come from the
wheel's package data.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from builder.synth import SynthSpec, write_synthetic

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "builder", "engines", "calib")
SKIP_COPY = shutil.ignore_patterns("__pycache__", "*.pyc")


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{args}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """(venv, env) with builder installed from a freshly built wheel."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    for name in SOURCES:
        origin = REPO / name
        if origin.is_dir():
            shutil.copytree(origin, src / name, symlinks=True, ignore=SKIP_COPY)
        else:
            shutil.copy2(origin, src / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    _run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", "dist", "src/"],
        root,
        env,
    )
    (wheel,) = (root / "dist").glob("builder-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "builder/_data/engines/h100x4-fp8.toml" in names
    assert "builder/_data/calib/prompts.jsonl" in names
    assert not any(n.startswith("engines/") for n in names), "engines/ must not be top-level"

    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], root, env)
    python = venv / "bin" / "python"
    purelib = _run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root, env
    ).stdout.strip()
    # Dependencies (torch, modelopt, ...) come from this environment; appended after the new
    # venv's own site-packages, and without running this environment's .pth files, so the
    # editable install of the checkout stays invisible.
    Path(purelib, "outer-env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run(
        [*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)], root, env
    )
    return venv, env


def test_wheel_install_plans_and_quantizes_outside_the_checkout(installed, tmp_path):
    venv, env = installed
    builder = str(venv / "bin" / "builder")
    python = str(venv / "bin" / "python")
    probe = (
        "import builder; from builder.quantize.calib import calib_dir; "
        "from builder.deploy.profiles import profile_dirs; "
        "print(builder.__file__, calib_dir(), *profile_dirs())"
    )
    where = _run([python, "-c", probe], tmp_path, env).stdout.split()
    assert len(where) == 3
    for path in where:  # the package, its calibration data and its profiles
        assert Path(path).is_relative_to(venv), f"{path} is not inside the installed wheel"

    plan = _run(
        [builder, "plan", "--preset", "ultra-253b", "--target", "h100x4-fp8", "--json"],
        tmp_path,
        env,
    )
    (target_plan,) = json.loads(plan.stdout)["plans"]
    assert target_plan["target"]["name"] == "h100x4-fp8" and target_plan["fits"]
    assert Path(target_plan["target"]["source"]).is_relative_to(venv)

    # The input checkpoint is data, written in-process (one interpreter start less).
    write_synthetic(tmp_path / "ckpt", SynthSpec(preset="mixed", hidden=64, heads=4))
    _run(
        [
            builder,
            "quantize",
            "ckpt",
            "fp8",
            "--calib",
            "builtin",
            "--calib-size",
            "4",
            "--calib-seq-len",
            "32",
            "--format",
            "hf",
        ],
        tmp_path,
        env,
    )
    manifest = json.loads((tmp_path / "fp8" / "manifest.json").read_text())
    assert manifest["calibration"]["dataset"] == "builtin"
    assert manifest["calibration"]["samples_used"] >= 1
    assert (tmp_path / "fp8" / "hf" / "config.json").is_file()

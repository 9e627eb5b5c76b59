"""The model card's usage works after `import builder` alone, with no remote code, and that
import stays cheap (no torch, no transformers until transformers itself is imported)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from builder import chat

ROOT = Path(__file__).resolve().parents[2]


def snippet(doc: Path) -> str:
    """The first ```python block of `doc`."""
    return re.search(r"```python\n(.*?)```", doc.read_text(), re.DOTALL).group(1)


def python(code: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_import_builder_is_cheap_and_registers_when_transformers_loads(tmp_path):
    done = python(
        "import sys, builder\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
        "from transformers import AutoConfig\n"
        "from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING as M\n"
        "for kind in ('nemotron-nas', 'deci'):\n"
        "    config = AutoConfig.for_model(kind)\n"
        "    print(type(config).__module__, M[type(config)].__module__)\n",
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["builder.model.configuration", "builder.model.modeling"] * 2


def test_import_builder_after_transformers_registers_at_once(tmp_path):
    done = python(
        "import transformers, builder\n"
        "print(type(transformers.AutoConfig.for_model('nemotron-nas')).__module__)",
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "builder.model.configuration"


def test_model_card_pipeline_snippet_runs_on_real_smollm2(smollm2_ckpt, tmp_path):
    """The README's block and docs/model-card.md's are the same, and it runs as written:
    transformers.pipeline over the checkpoint, reasoning off (greedy) answers Paris."""
    code = snippet(ROOT / "docs" / "model-card.md")
    assert code in (ROOT / "README.md").read_text()
    assert "trust_remote_code" not in code
    assert f'"{chat.REASONING_ON}"' in code and f'"{chat.REASONING_OFF}"' in code
    (tmp_path / "smollm2").symlink_to(smollm2_ckpt)
    for name in ("configuration_decilm.py", "modeling_decilm.py"):
        assert not (smollm2_ckpt / name).exists()
    done = python(code, tmp_path)
    assert done.returncode == 0, done.stderr
    lines = dict(line.split(":", 1) for line in done.stdout.splitlines() if ":" in line)
    assert "Paris" in lines["reasoning off"]
    assert lines["reasoning on"].strip()

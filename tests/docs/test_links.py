"""Every relative link in the README and docs/ points at a file of the repository."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_relative_links_resolve():
    broken = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in LINK.findall(doc.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            path = (doc.parent / target).resolve()
            if not path.exists():
                broken.append(f"{doc.relative_to(ROOT)} -> {target}")
    assert broken == []


def test_runbook_names_no_reference_file_outside_the_repository():
    text = (ROOT / "docs" / "dgx-runbook.md").read_text()
    assert "benchmarks.md" not in text
    assert "`triton.md`" not in text and "[triton.md](triton.md)" in text


def test_ci_runs_both_readme_commands():
    """The README's first block: install + demo, install + tests; .ci/run runs both."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```\n(.*?)```", readme, re.DOTALL).group(1).splitlines()
    assert block == [
        "bash scripts/install.sh && .venv/bin/builder demo",
        "bash scripts/install.sh && .venv/bin/python -m pytest -q",
    ]
    ci = [
        line for line in (ROOT / ".ci" / "run").read_text().splitlines() if not line.startswith("#")
    ]
    assert "bash scripts/install.sh" in ci
    assert any(line.startswith(".venv/bin/builder demo") for line in ci)
    assert ".venv/bin/python -m pytest -q" in ci

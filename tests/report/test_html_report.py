"""The HTML report, rendered by a real headless Chromium; the screenshot must show content."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess

import pytest

from builder.report.render import write_report
from tests.report.factories import bench_record, verify_record

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def browser() -> str | None:
    return next((path for path in map(shutil.which, BROWSERS) if path), None)


def screenshot(html_path, png_path, profile_dir) -> subprocess.CompletedProcess | str:
    """Headless Chromium screenshot of a file:// page; its whole process group ends with it."""
    command = [
        browser(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--no-first-run",
        f"--user-data-dir={profile_dir}",
        "--window-size=1200,2600",
        f"--screenshot={png_path}",
        html_path.as_uri(),
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        out, _ = process.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        return "chromium did not finish within 90 s"
    return subprocess.CompletedProcess(command, process.returncode, out.decode(errors="replace"))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    records = [bench_record("trtllm-bf16", "a" * 64, c) for c in (1, 2, 4, 8)]
    records += [bench_record("trtllm-fp8", "b" * 64, c, slowdown=-0.3) for c in (1, 2, 4, 8)]
    records += [verify_record("trtllm-fp8", "b" * 64, 0.01)]
    return write_report(records, tmp_path_factory.mktemp("report"))


def test_page_is_self_contained(report):
    text = report["html"].read_text()
    images = re.findall(r"<img [^>]*src='([^']*)'", text)
    assert len(images) == 5  # throughput, TTFT/ITL, throughput-latency, KL per position, per block
    assert all(src.startswith("data:image/png;base64,") for src in images)
    assert not re.search(
        r"(src|href)=['\"](https?:|file:|/)", text
    )  # nothing fetched from anywhere
    markdown = report["markdown"].read_text()
    assert "## Throughput vs concurrency" in markdown and "report-0.png" in markdown


def test_chromium_renders_the_report(report, tmp_path):
    if browser() is None:
        pytest.skip(
            "no Chromium on PATH (Debian: apt-get install chromium; scripts/install.sh does it)"
        )
    from PIL import Image

    png = tmp_path / "shot.png"
    result = screenshot(report["html"], png, tmp_path / "profile")
    if isinstance(result, str) or not png.is_file():
        pytest.skip(
            "Chromium could not start here: "
            f"{result if isinstance(result, str) else result.stdout[-300:]}"
        )
    image = Image.open(png).convert("RGB")
    assert image.size == (1200, 2600)
    pixels = image.resize((300, 650)).getdata()
    non_white = sum(1 for p in pixels if min(p) < 235) / len(pixels)
    colourful = sum(1 for r, g, b in pixels if max(r, g, b) - min(r, g, b) > 60) / len(pixels)
    assert non_white > 0.05, f"the page looks blank ({non_white:.1%} non-white)"
    assert colourful > 0.002, f"no plot colours on the page ({colourful:.2%})"

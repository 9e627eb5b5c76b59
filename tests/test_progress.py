"""builder.progress outside a terminal: plain lines with done/total and ETA at least every
interval, on a fake clock (no sleeps); and the stages' non-TTY output through the CLI."""

from __future__ import annotations

import io
import re

from click.testing import CliRunner

from builder.cli import main
from builder.convert.progress import RankProgress
from builder.progress import LineReporter, NullReporter, Phases, reporter


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_lines_at_start_every_interval_and_at_the_end():
    clock, out = FakeClock(), io.StringIO()
    report = LineReporter("quantize", stream=out, clock=clock, heartbeat=False)
    report.start("calibrating", 81, "blocks")
    report.update("calibrating", 0)
    for block in range(1, 81):
        clock.now += 1.5  # one block every 1.5 s: a line every 7th block (>= 10 s apart)
        report.update("calibrating", block, note=f"block {block}")
    clock.now += 1.5
    report.finish("calibrating")
    text = lines(out)
    assert text[0] == "quantize: calibrating 0/81 blocks (0%), 0:00 elapsed, ETA unknown"
    assert text[1] == "quantize: calibrating 7/81 blocks (9%), 0:10 elapsed, ETA 1:51 - block 7"
    assert text[-1] == "quantize: calibrating 81/81 blocks (100%), done in 2:02 - block 80"
    assert len(text) == 13  # 0, 7, 14, ..., 77, then done


def test_heartbeat_reports_a_step_that_reports_nothing():
    """One block taking a minute still gives a line every interval (the heartbeat's tick)."""
    clock, out = FakeClock(), io.StringIO()
    report = LineReporter("check", stream=out, clock=clock, heartbeat=False)
    report.start("round trip", 4, "tensors")
    report.update("round trip", 1)
    for _ in range(6):
        clock.now += 10
        report.tick()
    assert len(lines(out)) == 1 + 6
    assert lines(out)[-1] == "check: round trip 1/4 tensors (25%), 1:00 elapsed, ETA 3:00"


def test_bytes_show_rate_and_rank_tasks_stay_out_of_the_log():
    clock, out = FakeClock(), io.StringIO()
    sink = RankProgress(LineReporter("convert", stream=out, clock=clock, heartbeat=False))
    mib = 1 << 20
    with sink:
        sink.add_rank(0, 100 * mib, "rank 0")
        sink.add_rank(1, 100 * mib, "rank 1")
        for _ in range(10):
            clock.now += 2
            sink.advance(0, 10 * mib)
            sink.advance(1, 10 * mib)
        sink.done(0, "written")
        sink.done(1, "written")
    assert lines(out) == [
        "convert: all ranks 10.0 MiB/200.0 MiB (5%), 0:00 elapsed, ETA unknown - 0/2 ranks done",
        "convert: all ranks 110.0 MiB/200.0 MiB (55%), 0:10 elapsed, 11.0 MiB/s, ETA 0:08 - 0/2 "
        "ranks done",
        "convert: all ranks 200.0 MiB/200.0 MiB (100%), done in 0:18 - 2/2 ranks done",
    ]  # per-rank tasks are bars only: in a log the total says it all


def test_reporter_picks_lines_off_a_terminal_and_nothing_when_disabled():
    assert isinstance(reporter("x", stream=io.StringIO()), LineReporter)
    assert isinstance(reporter("x", enabled=False), NullReporter)


def test_quantize_without_a_terminal_prints_progress_lines(mixed_ckpt, tmp_path):
    result = CliRunner().invoke(
        main,
        [
            "quantize",
            str(mixed_ckpt),
            str(tmp_path / "q"),
            "--calib-size",
            "4",
            "--calib-seq-len",
            "16",
            "--dtype",
            "float32",
        ],
    )
    assert result.exit_code == 0, result.output
    err = result.stderr
    assert "calibrating 10 of 12 blocks (2 empty blocks skipped)" in err
    assert "quantize: calibrating 0/10 blocks (0%)" in err
    assert "quantize: calibrating 10/10 blocks (100%), done in" in err


def test_check_roundtrip_without_a_terminal_prints_progress_lines(mixed_ckpt, tmp_path):
    out = tmp_path / "tp2"
    assert (
        CliRunner().invoke(main, ["convert", str(mixed_ckpt), str(out), "--tp", "2"]).exit_code == 0
    )
    result = CliRunner().invoke(
        main, ["check", str(out), "--source", str(mixed_ckpt), "--roundtrip"]
    )
    assert result.exit_code == 0, result.output
    assert re.search(
        r"check: round trip 1/(\d+) tensors \(\d+%\), 0:\d\d elapsed, ETA", result.stderr
    )
    assert re.search(r"check: round trip (\d+)/\1 tensors \(100%\), done in", result.stderr)
    assert "check: finite scan" in result.stderr


def test_convert_without_a_terminal_prints_progress_lines(mixed_ckpt, tmp_path):
    result = CliRunner().invoke(
        main, ["convert", str(mixed_ckpt), str(tmp_path / "tp2"), "--tp", "2"]
    )
    assert result.exit_code == 0, result.output
    assert re.search(
        r"convert: all ranks [\d.]+ MiB/[\d.]+ MiB \(100%\), done in 0:\d\d - 2/2 ranks done",
        result.stderr,
    )
    assert "━" not in result.stderr  # no bar characters in a log


def test_phases_of_unknown_size_still_print_every_interval():
    """An export that reports no counts: its message, then a line per interval, then done."""
    clock, out = FakeClock(), io.StringIO()
    report = LineReporter("quantize", stream=out, clock=clock, heartbeat=False)
    phases = Phases(report)
    phases("writing FP8 TensorRT-LLM checkpoint (tp=4, pp=1)")
    for _ in range(3):
        clock.now += 10
        report.tick()
    clock.now += 4
    phases.close()
    assert lines(out) == [
        "quantize: writing FP8 TensorRT-LLM checkpoint (tp=4, pp=1)",
        "quantize: writing FP8 TensorRT-LLM checkpoint (tp=4, pp=1), 0:10 elapsed",
        "quantize: writing FP8 TensorRT-LLM checkpoint (tp=4, pp=1), 0:20 elapsed",
        "quantize: writing FP8 TensorRT-LLM checkpoint (tp=4, pp=1), 0:30 elapsed",
        "quantize: writing FP8 TensorRT-LLM checkpoint (tp=4, pp=1), done in 0:34",
    ]

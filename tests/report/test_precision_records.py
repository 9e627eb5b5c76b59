"""FP8-vs-BF16 from real records: two converted artifacts benched by `builder bench`, verified
by `builder verify --history`, laid side by side by `builder report compare --precision`. The
accuracy column comes from the verify records, found by the artifacts' manifest sha256."""

from __future__ import annotations

import json

import pytest

from builder.cli import main
from builder.convert import convert_checkpoint
from builder.report.history import History

LOOSE = """[loose]
kl_mean_max = 1000.0
"""


def cli(args, capsys) -> dict | list:
    try:
        main(args, standalone_mode=False)
    except SystemExit as exit:  # verify exits 0 (pass) / 1 (fail): either way a record
        assert exit.code in (0, 1, None)
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow
def test_precision_table_with_accuracy_from_real_verify_records(
    mixed_ckpt_fp32, tmp_path, capsys, one_torch_thread
):
    from builder.verify.golden import GoldenSettings, build_golden

    arts = {dtype: tmp_path / f"trt-{dtype}" for dtype in ("float32", "bfloat16")}
    for dtype, out in arts.items():
        convert_checkpoint(mixed_ckpt_fp32, out, tp=1, dtype=dtype)
    golden = build_golden(
        mixed_ckpt_fp32,
        tmp_path / "golden",
        GoldenSettings(windows=1, seq_len=16, chat_prompts=0, continuation=2, dtype="float32"),
    )
    thresholds = tmp_path / "t.toml"
    thresholds.write_text(LOOSE)
    history = tmp_path / "h.sqlite"
    for dtype, art in arts.items():
        cli(
            ["bench", str(art), "--isl", "6", "--osl", "3", "--concurrency", "1,2",
             "--repeat", "2", "--warmup", "0", "--out", str(tmp_path / f"bench-{dtype}"),
             "--history", str(history), "--json"],
            capsys,
        )  # fmt: skip
        cli(
            ["verify", str(art), "--golden", str(golden), "--thresholds", str(thresholds),
             "--section", "loose", "--report", str(tmp_path / "verify"), "--history",
             str(history), "--json"],
            capsys,
        )  # fmt: skip
    with History(history) as db:
        assert sorted(str(r.kind) for r in db.query()) == ["bench"] * 4 + ["verify"] * 2
    table = cli(
        ["report", "compare", str(tmp_path / "bench-float32"), str(tmp_path / "bench-bfloat16"),
         "--precision", "--verify", str(tmp_path / "verify"), "--json"],
        capsys,
    )  # fmt: skip
    assert table["headline"].startswith("trtllm-bf16 vs trtllm-float32 output tokens/s: ")
    assert "at concurrency 1" in table["headline"] and "at concurrency 2" in table["headline"]
    assert len(table["accuracy"]) == 2  # both artifacts' verify records matched by sha256
    fp32 = next(v for k, v in table["accuracy"].items() if k.startswith("trtllm-float32"))
    bf16 = next(v for k, v in table["accuracy"].items() if k.startswith("trtllm-bf16"))
    assert fp32["kl_mean"] < bf16["kl_mean"]  # the fp32 conversion is the golden's own rounding
    assert not table["warnings"]  # same runtime and machine on both sides

"""`builder bench --url`: AIPerf (its own venv) drives a real vLLM server; its export becomes a
record."""

from __future__ import annotations

import json

import pytest

from builder.bench.aiperf import find_aiperf
from builder.cli import main
from builder.errors import UserError
from builder.report.records import read_record


@pytest.fixture(scope="module")
def aiperf():
    try:
        return find_aiperf()
    except UserError as err:
        pytest.skip(str(err))


# The session's vLLM start (~2 min on 2 cores, shared with verify's tests) + ~30 s AIPerf.
@pytest.mark.slow
def test_bench_a_real_server_with_aiperf(
    aiperf, openai_server, smollm2_llama_dir, tmp_path, capsys
):
    out = tmp_path / "bench"
    main(
        [
            "bench",
            "--url",
            openai_server,
            "--model",
            "smollm2",
            "--tokenizer",
            str(smollm2_llama_dir),
            "--isl",
            "32",
            "--osl",
            "8",
            "--concurrency",
            "2",
            "--requests",
            "4",
            "--warmup",
            "1",
            "--repeat",
            "1",
            "--out",
            str(out),
            "--history",
            str(tmp_path / "h.sqlite"),
            "--json",
        ],
        standalone_mode=False,
    )
    records = json.loads(capsys.readouterr().out)
    assert len(records) == 1
    record = read_record(next(out.glob("bench-*.json")))
    m, s = record.metrics, record.settings
    assert s["measured_osl"] == 8  # ignore_eos + min_tokens held the output length
    assert abs(s["measured_isl"] - 32) <= 2  # AIPerf's prompt of 32 tokens, re-counted by it
    assert s["requests"] == 4 and s["concurrency"] == 2 and "aiperf" in record.runtime
    for key in (
        "ttft_p50",
        "tpot_p50",
        "itl_p99",
        "e2e_latency_p50",
        "request_throughput",
        "output_token_throughput",
        "decode_speed_per_user",
    ):
        assert m[key].value > 0, key
    assert m["e2e_latency_p50"].value > m["ttft_p50"].value  # 7 more tokens after the first
    assert list(
        out.rglob("profile_export_aiperf.json")
    )  # AIPerf's own export kept beside the record

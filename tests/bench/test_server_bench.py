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


def bench_once(target: list[str], isl: int, osl: int, out, capsys):
    """One `builder bench` of a server target: 4 requests at concurrency 2 after 1 warmup, one
    repeat, into `out` and a history beside it; the one record it writes."""
    main(
        [
            "bench",
            *target,
            *("--isl", str(isl), "--osl", str(osl), "--concurrency", "2", "--requests", "4"),
            *("--warmup", "1", "--repeat", "1", "--out", str(out)),
            *("--history", str(out.parent / "h.sqlite"), "--json"),
        ],
        standalone_mode=False,
    )
    records = json.loads(capsys.readouterr().out)
    assert len(records) == 1
    return read_record(next(out.glob("bench-*.json")))


# The session's vLLM start (~2 min on 2 cores, shared with verify's tests) + ~30 s AIPerf.
@pytest.mark.slow
def test_bench_a_real_server_with_aiperf(
    aiperf, openai_server, smollm2_llama_dir, tmp_path, capsys
):
    out = tmp_path / "bench"
    record = bench_once(
        ["--url", openai_server, "--model", "smollm2", "--tokenizer", str(smollm2_llama_dir)],
        isl=32,
        osl=8,
        out=out,
        capsys=capsys,
    )
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


# tritonserver start (~30-60 s on 2 cores) + AIPerf against the generate_stream endpoint.
@pytest.mark.slow
def test_bench_a_real_triton_server_with_aiperf(aiperf, triton_server, tmp_path, capsys):
    """`--triton`: AIPerf's template endpoint on /v2/models/ensemble/generate_stream of the real
    tritonserver (the generated repository, tensorrt_llm = the executor stand-in)."""
    out = tmp_path / "bench"
    record = bench_once(
        [
            "--triton",
            f"http://{triton_server.http_url}",
            "--model",
            "ensemble",
            "--tokenizer",
            str(triton_server.build.hf_dir),
        ],
        isl=16,
        osl=4,
        out=out,
        capsys=capsys,
    )
    m, s = record.metrics, record.settings
    assert "Triton" in record.runtime and s["endpoint"] == "triton"
    assert s["requests"] == 4 and s["concurrency"] == 2
    # max_tokens alone bounds OSL on Triton (no ignore_eos field). AIPerf counts output tokens by
    # re-tokenizing the streamed text: random bytes of this synthetic model decode to U+FFFD and
    # re-encode as 3 bytes, so the measured OSL may exceed max_tokens here (not with real text).
    assert s["measured_osl"] >= 1
    assert s["measured_isl"] is None  # the template endpoint's export has no ISL: not invented
    for key in ("ttft_p50", "e2e_latency_p50", "request_throughput", "output_token_throughput"):
        assert m[key].value > 0, key
    assert m["e2e_latency_p50"].value >= m["ttft_p50"].value
    assert list(out.rglob("profile_export_aiperf.json"))
    with capsys.disabled():
        print(
            f"\n  triton via AIPerf: measured ISL/OSL {s['measured_isl']}/{s['measured_osl']}, "
            + ", ".join(f"{k} {m[k].value:.4g} {m[k].unit}" for k in sorted(m) if "p50" in k)
            + f", output {m['output_token_throughput'].value:.4g} tok/s"
        )


def test_aiperf_gets_a_tokenizer_only_copy(mixed_ckpt, tmp_path):
    """A nemotron-nas model directory (the Ultra's layout) as --tokenizer: AIPerf's
    AutoTokenizer would read its config.json, which does not load without remote code; AIPerf
    gets the tokenizer files alone and the input directory is untouched."""
    from builder.bench.aiperf import tokenizer_only

    before = {p.name: p.stat().st_mtime_ns for p in mixed_ckpt.iterdir()}
    staged = tokenizer_only(mixed_ckpt, tmp_path)
    names = {p.name for p in staged.iterdir()}
    assert "tokenizer_config.json" in names and "tokenizer.json" in names
    assert "config.json" not in names and not any(n.endswith(".safetensors") for n in names)
    for name in names:
        assert (staged / name).read_bytes() == (mixed_ckpt / name).read_bytes()
    assert {p.name: p.stat().st_mtime_ns for p in mixed_ckpt.iterdir()} == before
    with pytest.raises(UserError, match="not a local tokenizer directory"):
        tokenizer_only(tmp_path / "nothing", tmp_path / "out")

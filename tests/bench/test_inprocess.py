"""`builder bench CHECKPOINT`: the executor in process, records that say so, the roofline beside."""

from __future__ import annotations

import json

import pytest
import torch

from builder.bench.inprocess import bench_checkpoint, roofline
from builder.bench.workload import parse_pairs, synthetic_prompts, workloads
from builder.cli import main
from builder.convert import convert_checkpoint
from builder.errors import UserError
from builder.report.history import History


@pytest.fixture(scope="module")
def trt(mixed_ckpt_fp32, tmp_path_factory, one_torch_thread):
    out = tmp_path_factory.mktemp("bench") / "trt"
    convert_checkpoint(mixed_ckpt_fp32, out, tp=2)
    return out


def test_records_of_an_executor_bench(trt):
    points = workloads([(6, 4)], [1, 2], requests=None, warmup=1, repeat=2, seed=0)
    records = bench_checkpoint(trt, points)
    assert [r.settings["workload"] for r in records] == [
        "isl=6,osl=4,concurrency=1",
        "isl=6,osl=4,concurrency=2",
    ]
    for record in records:
        m, s = record.metrics, record.settings
        assert (
            record.runtime == "executor"
            and s["engine"] is False
            and "not a TensorRT-LLM engine" in s["note"]
        )
        assert s["requests"] == 2 * s["concurrency"] and s["repeat"] == 2 and s["tp"] == 2
        assert len(m["ttft_p50"].repeats) == 2
        # every request produced exactly OSL tokens: output tok/s = OSL x req/s, in every repeat
        for out, req in zip(
            m["output_token_throughput"].repeats, m["request_throughput"].repeats, strict=True
        ):
            assert out == pytest.approx(4 * req)
        assert m["e2e_latency_p50"].value > m["ttft_p50"].value > 0
        assert m["kv_cache_memory"].value > 0 and m["peak_memory"].value > 0
        bound = record.details["roofline"]
        assert bound == roofline(trt, "h200x8-bf16", s["concurrency"], 6 + 4 // 2)
        assert m["roofline_step_ms"].value == pytest.approx(bound["step_ms_at_concurrency"])
        assert bound["bytes_read_per_gpu_per_step"] > 0 and bound["hbm_bandwidth_tbs"] == 4.8


def test_resident_runtime_benches_like_the_executor(trt, tmp_path, capsys):
    """`--runtime resident`: the same points and metrics, records that name it, and its
    greedy tokens are the executor's (fp32 on the CPU: the same ops within fp32 rounding)."""
    from builder.runtime import TrtllmCheckpointExecutor
    from builder.runtime.resident import ResidentRuntime

    points = workloads([(6, 4)], [2], requests=None, warmup=0, repeat=1, seed=0)
    (record,) = bench_checkpoint(trt, points, runtime="resident")
    assert record.runtime == "resident" and record.settings["engine"] is False
    assert "resident runtime" in record.settings["note"] and "(in-process resident)" in (
        record.target
    )
    m = record.metrics
    assert m["output_token_throughput"].value == pytest.approx(4 * m["request_throughput"].value)
    assert m["kv_cache_memory"].value > 0
    prompts = synthetic_prompts(1000, 6, 2, seed=3)
    with TrtllmCheckpointExecutor(trt, keep_weights=True) as executor:
        expected = executor.greedy(prompts, 4).tokens
    with ResidentRuntime.from_checkpoint(trt, dtype=torch.float32, max_seq=10) as rt:
        generation = rt.greedy(prompts, 4)
        assert generation.tokens == expected and len(generation.token_times) == 4
        with pytest.raises(UserError, match="one length only"):
            rt.greedy([[1, 2], [3]], 2)
        assert rt.max_seq == 64  # rounded up to whole decode-attention tiles
        with pytest.raises(UserError, match="max_seq"):
            rt.greedy(prompts, 64 - 6 + 1)
    main(
        ["bench", str(trt), "--runtime", "resident", "--isl", "5", "--osl", "2"]
        + ["--concurrency", "1", "--repeat", "1", "--warmup", "0", "--no-history"]
        + ["--out", str(tmp_path / "out"), "--json"],
        standalone_mode=False,
    )
    assert json.loads(capsys.readouterr().out)[0]["runtime"] == "resident"
    refused = main(
        ["bench", "--url", "http://127.0.0.1:9", "--runtime", "resident"], standalone_mode=False
    )
    assert refused == 2 and "only a CHECKPOINT" in capsys.readouterr().err


def test_cli_bench_then_history(trt, tmp_path, capsys):
    main(
        [
            "bench",
            str(trt),
            "--isl",
            "5",
            "--osl",
            "3",
            "--concurrency",
            "2",
            "--repeat",
            "1",
            "--warmup",
            "0",
            "--out",
            str(tmp_path / "out"),
            "--history",
            str(tmp_path / "h.sqlite"),
            "--json",
        ],
        standalone_mode=False,
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed[0]["runtime"] == "executor" and printed[0]["settings"]["osl"] == 3
    with History(tmp_path / "h.sqlite") as history:
        assert [r.settings["workload"] for r in history.query(runtime="executor")] == [
            "isl=5,osl=3,concurrency=2"
        ]


def test_prompts_are_exact_length_and_seeded():
    a = synthetic_prompts(1000, 17, 3, seed=5)
    assert [len(p) for p in a] == [17, 17, 17] and a == synthetic_prompts(1000, 17, 3, seed=5)
    assert a != synthetic_prompts(1000, 17, 3, seed=6)


def test_bad_workloads():
    assert parse_pairs("128/128, 512/64") == [(128, 128), (512, 64)]
    for bad in ("128", "0/5", "a/b", ""):
        with pytest.raises(UserError):
            parse_pairs(bad)
    with pytest.raises(UserError, match="not a TensorRT-LLM checkpoint"):
        bench_checkpoint("/nonexistent", workloads([(4, 2)], [1], None, 0, 1, 0))

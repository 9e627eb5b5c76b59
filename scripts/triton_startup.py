"""Triton start-up cost on this machine: the generated engine repository of a small synthetic
build, tensorrt_llm replaced by the CPU executor stand-in, served by nvidia-pytriton's
tritonserver. Prints wall seconds to ready, the CPU seconds the server and its Python-backend
stubs spent getting there (wall on N quiet cores is about that divided by N), the first
answer's latency and the stop time, as JSON.

    .venv/bin/python scripts/triton_startup.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def group_cpu_seconds(pgid: int) -> float:
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # fields[2] is the process group; 11, 12 are utime, stime
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    from builder.convert import convert_checkpoint
    from builder.deploy import dry_run_build, load_profile
    from builder.synth import SynthSpec, write_synthetic
    from builder.triton import TritonOptions, read_build_record, write_repository
    from builder.triton.client import generate_http
    from builder.triton.server import TritonServer
    from builder.triton.standin import executor_repository

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        hf = write_synthetic(
            root / "hf", SynthSpec(preset="mixed", hidden=64, vocab=261, dtype="float32")
        )
        convert_checkpoint(hf, root / "trtllm", tp=1, progress=False)
        profile = load_profile("h100x8-bf16", [("parallel.tp", 1), ("build.max_batch_size", 4)])
        build = dry_run_build(root / "trtllm", profile, root / "build").out
        options = TritonOptions(
            tokenizer_dir=Path(hf), decoupled=True, tokenizer_instances=1, bls_instances=1
        )
        write_repository(read_build_record(build), options, root / "repo")
        served = executor_repository(root / "repo", root / "trtllm", root / "served")
        runs = []
        for _ in range(args.repeat):
            server = TritonServer(served)
            started = time.perf_counter()
            server.start()
            ready = time.perf_counter() - started
            cpu = group_cpu_seconds(server.process.pid)
            asked = time.perf_counter()
            generate_http(
                server.http_url,
                "ensemble",
                {"text_input": "What is the capital of France?", "max_tokens": 8},
            )
            answer = time.perf_counter() - asked
            stopping = time.perf_counter()
            server.stop()
            runs.append(
                {
                    "ready_s": round(ready, 2),
                    "cpu_s_to_ready": round(cpu, 2),
                    "first_answer_8_tokens_s": round(answer, 2),
                    "stop_s": round(time.perf_counter() - stopping, 2),
                    "load_average_1m": round(os.getloadavg()[0], 1),
                }
            )
    print(json.dumps({"cores": os.cpu_count(), "runs": runs}, indent=2))


if __name__ == "__main__":
    main()

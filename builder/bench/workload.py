"""Bench workloads: ISL/OSL pairs, concurrency levels, request counts, seeded prompts."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

from builder.errors import UserError


@dataclass(frozen=True)
class Workload:
    """One measured point. OSL is fixed (EOS ignored), prompts are exactly ISL tokens."""

    isl: int
    osl: int
    concurrency: int
    requests: int
    warmup: int
    repeat: int
    seed: int = 0

    @property
    def key(self) -> str:
        """What two records must share to be compared (settings["workload"])."""
        return f"isl={self.isl},osl={self.osl},concurrency={self.concurrency}"

    def settings(self) -> dict:
        return {
            **asdict(self),
            "workload": self.key,
            "osl_enforced": "fixed OSL: EOS ignored, exactly osl tokens generated per request",
        }


def parse_pairs(text: str) -> list[tuple[int, int]]:
    """'128/128,512/64' -> [(128, 128), (512, 64)]."""
    pairs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        isl, sep, osl = item.partition("/")
        try:
            pair = (int(isl), int(osl))
        except ValueError:
            pair = (0, 0)
        if not sep or min(pair) < 1:
            raise UserError(
                f"--isl-osl {item!r}: expected ISL/OSL with positive integers, e.g. 128/128"
            )
        pairs.append(pair)
    if not pairs:
        raise UserError("--isl-osl: at least one ISL/OSL pair")
    return pairs


def parse_counts(text: str, option: str) -> list[int]:
    """'1,4,16' -> [1, 4, 16]."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise UserError(f"{option} {text!r}: expected positive integers separated by commas")
    return values


def workloads(
    pairs: list[tuple[int, int]],
    concurrencies: list[int],
    requests: int | None,
    warmup: int,
    repeat: int,
    seed: int,
) -> list[Workload]:
    """Every pair at every concurrency; `requests` None: 2 x concurrency per point."""
    if repeat < 1 or warmup < 0:
        raise UserError("--repeat must be >= 1 and --warmup >= 0")
    return [
        Workload(isl, osl, c, requests or 2 * c, warmup, repeat, seed)
        for isl, osl in pairs
        for c in concurrencies
    ]


def synthetic_prompts(
    vocab_size: int, isl: int, count: int, seed: int, exclude: frozenset[int] = frozenset()
) -> list[list[int]]:
    """`count` prompts of exactly `isl` random token ids (trtllm-bench prepare-dataset style:
    random vocabulary ids, fixed length), seeded; `exclude` keeps special ids out."""
    rng = random.Random(f"{seed}:{isl}")
    ids = [i for i in range(vocab_size) if i not in exclude]
    return [[rng.choice(ids) for _ in range(isl)] for _ in range(count)]

"""Unit roundoffs and the rounding-count model every numeric test derives its bounds from.

Bounds are derived from rounding, never measured: CPUs differ in their GEMM kernels. Along the
longest path through one block there are ROUNDINGS_PER_BLOCK rounded operations: attention
(norm, q/k/v projection, rope, scores, softmax, weighted sum, o_proj, residual add) and FFN
(norm, gate/up, SiLU, product, down_proj, residual add).
"""

from __future__ import annotations

ROUNDINGS_PER_BLOCK = 14
FP32_UNIT_ROUNDOFF = 2.0**-24  # one fp32 rounding moves a value by at most 2^-24 of itself
BF16_UNIT_ROUNDOFF = 2.0**-9  # rounding to 8 significant bits: at most 2^-9 of the value


def fp32_tolerance(num_layers: int) -> float:
    """Relative error (max |a - b| / max |b|) allowed between two fp32 evaluations of the same
    model on the same weights after `num_layers` blocks and the head.

    They differ only in rounding: the same operations in another summation order (TP partial
    sums, fused q/k/v, another batching). Each rounded operation contributes at most one unit
    roundoff and the errors add at most linearly along the path: blocks x ROUNDINGS_PER_BLOCK,
    plus the final norm and lm_head, times 2^-24 (1.0e-5 for 12 blocks). A real mistake (a
    wrong KV head, a missing rope scaling, a misplaced TP shard) moves values by O(0.1) or more.
    """
    return (num_layers * ROUNDINGS_PER_BLOCK + 2) * FP32_UNIT_ROUNDOFF

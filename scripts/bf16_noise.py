"""Print the bf16 errors that tests/runtime/test_executor.py bounds, on this machine's CPU.

  PYTHONPATH=. python scripts/bf16_noise.py

e_ref: the reference model's own bf16 error against fp32; e_exec: the executor's (bf16,
tp x pp) against fp32; e_pair: executor against the bf16 reference. The test allows
e_exec <= 2 e_ref + 2^-8 and e_pair <= 3 e_ref + 2^-8 (derivation in its docstring).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from builder.convert import convert_checkpoint
from builder.runtime import TrtllmCheckpointExecutor, compare_logits
from builder.runtime.compare import reference_logits
from builder.synth import SynthSpec, write_synthetic


def main() -> None:
    torch.set_num_threads(1)  # as the tests run
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_synthetic(Path(tmp) / "mixed", SynthSpec(preset="mixed"))
        ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
        ref32 = reference_logits(ckpt, ids, torch.float32)
        ref16 = reference_logits(ckpt, ids, torch.bfloat16)
        e_ref = compare_logits(ref16, ref32).relative_error
        ulp = 2.0**-8
        print(
            f"e_ref {e_ref:.5f}   bounds: e_exec <= {2 * e_ref + ulp:.5f}, e_pair <= "
            f"{3 * e_ref + ulp:.5f}"
        )
        for tp, pp in [(1, 1), (2, 1), (4, 2)]:
            out = Path(tmp) / f"trt-{tp}-{pp}"
            convert_checkpoint(ckpt, out, tp, pp)
            with TrtllmCheckpointExecutor(out, dtype=torch.bfloat16) as executor:
                logits = executor(ids)
            e_exec = compare_logits(logits, ref32).relative_error
            e_pair = compare_logits(logits, ref16).relative_error
            print(
                f"tp {tp} pp {pp}: e_exec {e_exec:.5f}  e_pair {e_pair:.5f}  "
                f"(old bound 1.5 e_ref = {1.5 * e_ref:.5f})"
            )


if __name__ == "__main__":
    main()

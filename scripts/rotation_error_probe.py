#!/usr/bin/env python
"""Would a residual-stream rotation (QuaRot / SpinQuant style, folded into the weights) lower
FP8's activation rounding error on a model? A first-order estimate from calibration statistics,
no quantization run needed (issue 16).

E4M3 rounds each element with a relative error of roughly fixed spread sigma, so a GEMM's output
error energy from its input's rounding is sigma^2 * sum_j c_j^2 E[x_j^2] (c_j: the norm of the
weight's column j, x: the GEMM's input). Rotating the residual stream by an orthogonal Q and
folding the RMSNorm gamma g into the next weights makes that input a Q with a = h / rms(h), and
the weight W diag(g) Q: for a random Q, in expectation sigma^2 * sum_j c_j^2 g_j^2 * mean_j
E[a_j^2]. The ratio E / E_rot is what rotation buys for the GEMMs that read the residual (q/k/v,
gate/up): above 1 it lowers the error, below 1 it raises it. For o_proj and down_proj inputs
(not foldable without an online rotation) the same ratio with even spreading is printed too.
Subnormals and clipping are ignored (per-token scales clip nothing).

Usage: python scripts/rotation_error_probe.py CHECKPOINT [--windows 8] [--seq-len 256] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    import builder.model  # noqa: F401  (registers nemotron-nas with transformers)
    from builder.quantize.calib import build_calibration_set, load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32).eval()
    data = build_calibration_set(
        "builtin", load_tokenizer(args.checkpoint), args.windows, args.seq_len, 0
    )
    energy: dict[str, list] = {}  # name -> [sum of x^2 per channel, tokens, linear, gamma]

    def watch(name, linear, gamma):
        def hook(module, inputs):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            entry = energy.setdefault(name, [0.0, 0, linear, gamma])
            entry[0] = entry[0] + (x * x).sum(0)
            entry[1] += x.shape[0]

        linear.register_forward_pre_hook(hook)

    for i, layer in enumerate(model.model.layers):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is not None and hasattr(attn, "q_proj"):
            watch(f"{i}.q_proj", attn.q_proj, layer.input_layernorm.weight)
            watch(f"{i}.o_proj", attn.o_proj, None)
        if mlp is not None and hasattr(mlp, "gate_proj"):
            watch(f"{i}.gate_proj", mlp.gate_proj, layer.post_attention_layernorm.weight)
            watch(f"{i}.down_proj", mlp.down_proj, None)
    with torch.no_grad():
        for window in data.windows:
            model(window[None])
    ratios: dict[str, list[float]] = {}
    for name, (squares, tokens, linear, gamma) in energy.items():
        mean_sq = squares / tokens
        c2 = linear.weight.detach().double().pow(2).sum(0)
        plain = float((c2 * mean_sq).sum())
        if gamma is not None:
            g2 = gamma.detach().double().pow(2)
            rotated = float((c2 * g2).sum() * (mean_sq / g2).mean())
        else:
            rotated = float(c2.sum() * mean_sq.mean())
        ratios.setdefault(name.split(".", 1)[1], []).append(round(plain / rotated, 3))
    for kind, values in ratios.items():
        t = torch.tensor(values)
        print(
            f"{kind:10s} E/E_rot median {t.median():.2f} (min {t.min():.2f}, max {t.max():.2f}); "
            f"layers above 1: {int((t > 1).sum())} of {len(values)}"
        )
    if args.json:
        args.json.write_text(json.dumps({"checkpoint": str(args.checkpoint), **ratios}, indent=1))


if __name__ == "__main__":
    main()

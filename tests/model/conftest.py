"""An independent float64 formulation of the nemotron-nas forward pass, for reference checks.

It shares nothing with builder: the block kinds come from which tensors each layer has in the
safetensors files, GQA is an explicit repeat_interleave, RMSNorm and llama3 RoPE are written
from their published formulas.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    weights = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            names = handle.keys()
            for name in names:
                weights[name] = handle.get_tensor(name).to(torch.float64)
    return weights


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """theta^(-2i/d); with llama3 scaling (Llama 3.1): long wavelengths divided by `factor`,
    short ones kept, the band between interpolated linearly in 1/wavelength."""
    inv = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if not scaling:
        return inv
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    context = scaling["original_max_position_embeddings"]
    out = []
    for f in inv.tolist():
        wavelength = 2 * math.pi / f
        if wavelength < context / high:
            out.append(f)
        elif wavelength > context / low:
            out.append(f / factor)
        else:
            smooth = (context / wavelength - low) / (high - low)
            out.append((1 - smooth) * f / factor + smooth * f)
    return torch.tensor(out, dtype=torch.float64)


def rotate(x: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """RoPE, rotate-half (GPT-NeoX) pairing: dimension i pairs with i + d/2. x: [heads, seq, d]."""
    angles = torch.arange(x.shape[1], dtype=torch.float64)[:, None] * inv_freq[None, :]
    cos, sin = angles.cos(), angles.sin()
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def attention(x, w, prefix, heads, head_dim, inv_freq):
    q = (x @ w[prefix + "q_proj.weight"].T).reshape(-1, heads, head_dim).transpose(0, 1)
    k = (x @ w[prefix + "k_proj.weight"].T).reshape(x.shape[0], -1, head_dim).transpose(0, 1)
    v = (x @ w[prefix + "v_proj.weight"].T).reshape(x.shape[0], -1, head_dim).transpose(0, 1)
    group = heads // k.shape[0]
    k, v = k.repeat_interleave(group, dim=0), v.repeat_interleave(group, dim=0)
    q, k = rotate(q, inv_freq), rotate(k, inv_freq)
    scores = q @ k.transpose(1, 2) / math.sqrt(head_dim)
    causal = torch.ones(x.shape[0], x.shape[0], dtype=torch.bool).triu(1)
    scores = scores.masked_fill(causal, float("-inf"))
    out = scores.softmax(-1) @ v
    return out.transpose(0, 1).reshape(x.shape[0], -1) @ w[prefix + "o_proj.weight"].T


def functional_logits(directory: Path, ids: list[int]) -> torch.Tensor:
    """[seq, vocab] float64 logits of one unpadded sequence."""
    config = json.loads((Path(directory) / "config.json").read_text())
    w = read_weights(directory)
    heads, hidden = config["num_attention_heads"], config["hidden_size"]
    head_dim, eps = hidden // heads, config["rms_norm_eps"]
    inv_freq = rope_inverse_frequencies(head_dim, config["rope_theta"], config.get("rope_scaling"))
    x = w["model.embed_tokens.weight"][torch.tensor(ids)]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        if p + "self_attn.q_proj.weight" in w:
            h = rms_norm(x, w[p + "input_layernorm.weight"], eps)
            x = x + attention(h, w, p + "self_attn.", heads, head_dim, inv_freq)
        elif p + "self_attn.linear_attn.weight" in w:
            h = rms_norm(x, w[p + "input_layernorm.weight"], eps)
            x = x + h @ w[p + "self_attn.linear_attn.weight"].T
        if p + "mlp.gate_proj.weight" in w:
            h = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
            gate, up = h @ w[p + "mlp.gate_proj.weight"].T, h @ w[p + "mlp.up_proj.weight"].T
            x = x + (torch.nn.functional.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T
        elif p + "mlp.linear_mlp.weight" in w:
            h = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
            x = x + h @ w[p + "mlp.linear_mlp.weight"].T
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return rms_norm(x, w["model.norm.weight"], eps) @ head.T


@pytest.fixture(scope="session")
def reference_logits():
    return functional_logits


@pytest.fixture(scope="session")
def ffn_first_ckpt(tmp_path_factory):
    """Ultra blocks 9 (empty), 42 (FFN-only), 43 (attention), 44 (FFN-only), 98 (attention):
    the first block owns no KV cache, so cache indexing by block number would break here."""
    from builder.synth import SynthSpec, write_synthetic

    spec = SynthSpec(preset="ultra-253b", hidden=64, layers="9,42-44,98", dtype="float32")
    return write_synthetic(tmp_path_factory.mktemp("ckpt") / "ffn-first", spec)

"""A plain transformers Llama and the same weights as a nemotron-nas checkpoint.

With every block a full attention + MLP block of one shape, nemotron-nas *is* Llama, so
ModelOpt's own exporters (which know Llama) give reference outputs for our writers.
"""

from __future__ import annotations

from pathlib import Path

import torch

from builder.io.hf_writer import write_hf_weights, write_json
from builder.synth import write_byte_tokenizer

HIDDEN, HEADS, KV_HEADS, FFN, VOCAB = 256, 8, 2, 512, 300
FFN_MULT = 3.0  # intermediate_size(3.0, 256) == 512


def llama_config(layers: int = 2):
    from transformers import LlamaConfig

    config = LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        vocab_size=VOCAB,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    config.architectures = ["LlamaForCausalLM"]
    return config


def nemotron_config(layers: int, dtype: str = "bfloat16") -> dict:
    block = {
        "attention": {
            "n_heads_in_group": HEADS // KV_HEADS,
            "no_op": False,
            "replace_with_linear": False,
        },
        "ffn": {"ffn_mult": FFN_MULT, "no_op": False, "replace_with_linear": False},
    }
    return {
        "architectures": ["DeciLMForCausalLM"],
        "model_type": "nemotron-nas",
        "hidden_size": HIDDEN,
        "num_attention_heads": HEADS,
        "num_hidden_layers": layers,
        "vocab_size": VOCAB,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "max_position_embeddings": 512,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "torch_dtype": dtype,
        "bos_token_id": 0,
        "eos_token_id": 4,
        "block_configs": [block] * layers,
    }


def llama_twin(out: Path, layers: int = 2, seed: int = 0):
    """(LlamaForCausalLM in bf16, nemotron-nas checkpoint dir holding the same weights)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(layers)).to(torch.bfloat16).eval()
    # .to() also cast RoPE's inv_freq buffer to bf16; from_pretrained (and our reference model)
    # keep it in fp32, so rebuild it.
    model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config)
    out.mkdir(parents=True)
    write_json(out / "config.json", nemotron_config(layers))
    write_byte_tokenizer(out)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    write_hf_weights(out, state.items())
    return model, out

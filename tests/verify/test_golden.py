"""The golden against the whole (not streamed) reference model, and its file format."""

from __future__ import annotations

import json

import pytest
import torch

from builder.errors import UserError
from builder.verify.golden import Golden, GoldenSettings, build_golden
from tests.tolerances import fp32_tolerance


@pytest.fixture(scope="module")
def synth_golden(tmp_path_factory, mixed_ckpt_fp32):
    prompts = tmp_path_factory.mktemp("prompts") / "p.jsonl"
    prompts.write_text(
        json.dumps({"text": "The quick brown fox jumps over the lazy dog."})
        + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "2+2?"}], "reasoning": False})
        + "\n"
    )
    settings = GoldenSettings(
        prompts=str(prompts), continuation=5, top_k=8, probe_len=12, dtype="float32"
    )
    return build_golden(mixed_ckpt_fp32, tmp_path_factory.mktemp("g") / "golden", settings)


def test_streamed_golden_equals_the_whole_reference_model(synth_golden, mixed_ckpt_fp32):
    from builder.model import load_reference_model

    golden = Golden.load(synth_golden)
    model = load_reference_model(mixed_ckpt_fp32, dtype=torch.float32)
    assert [p["id"] for p in golden.prompts] == ["user-1", "user-2"]
    assert "detailed thinking off" in golden.prompts[1]["text"]  # the card's system prompt
    for j in range(2):
        ids = golden.ids(j)
        with torch.no_grad():
            out = model(ids[None], use_cache=False, output_hidden_states=True)
        logits = out.logits[0, :-1].float()
        lp = torch.log_softmax(logits, -1)
        ref_lp, ref_ids = torch.topk(lp, 8)
        score = golden.score(j)
        # fp32 both ways, the same ops batched differently: rounding only. A logit moves by at
        # most fp32_tolerance x max|logit|; a log-prob is a logit minus logsumexp, which is
        # 1-Lipschitz in the max norm, so it moves by at most twice that.
        atol = 2 * fp32_tolerance(model.plan.num_layers) * float(logits.abs().max())
        assert torch.allclose(score.top_logprobs, ref_lp, rtol=0, atol=atol)
        assert torch.equal(score.top_ids[:, 0], ref_ids[:, 0])
        target = lp.gather(-1, ids[1:, None])[:, 0]
        assert torch.allclose(score.target_logprobs, target, rtol=0, atol=atol)
        seq, expected = ids.clone(), []
        for _ in range(5):  # greedy by full forwards (no cache) vs the golden's cached one
            with torch.no_grad():
                token = int(model(seq[None], use_cache=False).logits[0, -1].argmax())
            expected.append(token)
            seq = torch.cat([seq, torch.tensor([token])])
        assert golden.greedy(j) == expected
    probe = golden.tensors["probe.ids"]
    with torch.no_grad():
        states = model(probe[None], use_cache=False, output_hidden_states=True).hidden_states
    for layer in model.plan.layers:
        if not layer.is_empty:  # the state entering block i has been through i blocks
            state = states[layer.index][0]
            atol = fp32_tolerance(layer.index) * float(state.abs().max())
            assert torch.allclose(golden.probe_hidden(layer.index), state, rtol=0, atol=atol)
    blocks = golden.document["blocks"]
    assert len(blocks) == model.plan.num_layers and {b["kind"] for b in blocks} >= {
        "empty",
        "attention+ffn",
    }


def test_golden_records_settings_source_and_tokenizer(synth_golden, mixed_ckpt_fp32):
    doc = Golden.load(synth_golden).document
    assert doc["settings"]["top_k"] == 8 and doc["settings"]["continuation"] == 5
    assert (
        doc["source"]["path"] == str(mixed_ckpt_fp32.resolve())
        and len(doc["source"]["fingerprint"]) == 64
    )
    assert (
        len(doc["tokenizer"]["sha256"]) == 64
        and (synth_golden / "tokenizer" / "tokenizer.json").is_file()
    )
    assert not (synth_golden.parent / f".{synth_golden.name}.partial").exists()
    weights = doc["run"]["weights"]  # the block streaming, for the golden's own record
    assert weights["bytes"] > 0 and weights["blocks"] > 0 and weights["prefetch"] is False
    assert doc["run"]["peak_rss_bytes"] > 0 and doc["run"]["peak_gpu_bytes"] is None


def test_tampered_golden_is_refused(synth_golden, tmp_path):
    import shutil

    copy = tmp_path / "golden"
    shutil.copytree(synth_golden, copy)
    (copy / "golden.json").write_text(
        (copy / "golden.json").read_text().replace('"top_k": 8', '"top_k": 9')
    )
    with pytest.raises(UserError, match="does not match its manifest"):
        Golden.load(copy)
    with pytest.raises(UserError, match="not a golden directory"):
        Golden.load(tmp_path)


def test_smollm2_golden_prompt_sets(smollm2_golden):
    from builder.quantize.calib import is_heldout, wiki_samples

    golden = Golden.load(smollm2_golden)
    sets = [(p["set"], p["reasoning"]) for p in golden.prompts]
    assert sets == [("wiki", None), ("wiki", None), ("chat", True), ("chat", False)]
    calibration = "\n\n".join(s.text for s in wiki_samples(heldout=False))
    for p in golden.prompts[:2]:  # held-out text: disjoint from every calibration article
        assert p["tokens"] == 64 and p["text"][:60] not in calibration
    assert all(is_heldout(s.source.removeprefix("wiki:")) for s in wiki_samples(heldout=True)[:3])
    ppl = torch.exp(-torch.cat([golden.score(j).target_logprobs for j in range(2)]).mean())
    assert 5 < float(ppl) < 60  # a trained model on English text (vocab 49152)


def test_the_stream_holds_one_block_at_a_time(mixed_ckpt_fp32):
    """What lets Ultra's golden run on one GPU: without prefetch, no block is alive while the
    next one loads (the pass's loop must not keep the last one), and streaming computes what
    the kept blocks of a small model compute, bit for bit."""
    import weakref

    from builder.verify import stream

    alive: weakref.WeakSet = weakref.WeakSet()
    most = []

    def counting_loader(s, index):
        most.append(len(alive))  # blocks still alive when this one starts loading
        block = stream.bf16_block(s, index)
        alive.add(block)
        return block

    ids = [torch.tensor([5, 9, 33, 100, 7]), torch.tensor([44, 2, 250])]
    outputs = []
    for keep in (False, True):
        s = stream.BlockStream(
            mixed_ckpt_fp32, torch.float32, keep_blocks=keep, prefetch=False, loader=counting_loader
        )
        sequences = [stream.Sequence(torch.empty(0, dtype=torch.long)) for _ in ids]
        first = s.forward(sequences, ids, use_cache=True)
        outputs.append([*first, *s.forward(sequences, [torch.tensor([3])] * 2, use_cache=True)])
        if not keep:
            assert len(most) == 2 * sum(not lay.is_empty for lay in s.plan.layers)
            assert max(most) == 0
    for streamed, kept in zip(*outputs, strict=True):
        assert torch.equal(streamed, kept)

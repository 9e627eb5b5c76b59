"""Pure split rules and their inverses, without files."""

from __future__ import annotations

import pytest
import torch

from builder.arch import Split, preset_plan, rank_tensors
from builder.arch.tensors import hf_tensor_shapes
from builder.convert.sources import read_plan
from builder.convert.split import (
    ShardMismatch,
    chunk,
    kv_heads_of_rank,
    merge_qkv,
    merge_replicated,
    merge_tensor,
    merge_vocab,
    split_column,
    split_qkv,
    split_row,
    split_tensor,
    split_vocab,
    vocab_rows,
)
from builder.errors import ParallelismError

HD = 4  # head_dim of the hand-made tensors below


def heads_tensor(heads: int, width: int = 3, offset: float = 0.0) -> torch.Tensor:
    """Rows of head h are all h + offset, so every row says which head it came from."""
    return (
        (torch.arange(heads).repeat_interleave(HD)[:, None] + offset)
        .expand(heads * HD, width)
        .clone()
    )


def test_chunk_and_its_refusal():
    assert [chunk(12, 3, r) for r in range(3)] == [slice(0, 4), slice(4, 8), slice(8, 12)]
    with pytest.raises(ParallelismError, match="cannot be split evenly over tp 5"):
        chunk(12, 5, 0)


def test_kv_heads_are_chunked_or_duplicated_consecutively():
    assert [list(kv_heads_of_rank(8, 4, r)) for r in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert [list(kv_heads_of_rank(2, 8, r)) for r in range(8)] == [[0]] * 4 + [[1]] * 4
    assert [list(kv_heads_of_rank(1, 16, r)) for r in range(16)] == [[0]] * 16
    with pytest.raises(ParallelismError, match="not a multiple of 3 KV heads"):
        kv_heads_of_rank(3, 4, 0)


def test_vocab_rows_pad_the_last_ranks():
    assert vocab_rows(1000, 16, 0) == (slice(0, 63), 0)
    assert vocab_rows(1000, 16, 15) == (slice(945, 1000), 8)
    assert vocab_rows(10, 8, 7) == (slice(10, 10), 2)  # a rank with padding only
    assert (
        sum((r.stop - r.start) + pad for r, pad in (vocab_rows(1000, 16, k) for k in range(16)))
        == 1008
    )


def test_qkv_rank_block_is_q_then_k_then_v_with_duplicated_kv_heads():
    q, k, v = heads_tensor(8), heads_tensor(2, offset=100), heads_tensor(2, offset=200)
    parts = [split_qkv(q, k, v, 4, r, HD) for r in range(4)]
    # rank r: q heads 2r, 2r+1; kv head r // 2 (tp 4 > 2 kv heads: each duplicated twice)
    for r, part in enumerate(parts):
        assert part.shape == ((2 + 1 + 1) * HD, 3)
        assert part[:, 0].unique_consecutive().tolist() == [
            2 * r,
            2 * r + 1,
            100 + r // 2,
            200 + r // 2,
        ]
    assert all(
        torch.equal(a, b) for a, b in zip(merge_qkv(parts, 8, 2, HD), (q, k, v), strict=True)
    )


@pytest.mark.parametrize("tp", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("kv", [1, 2, 4, 8, 16])
def test_qkv_merge_inverts_split(tp, kv):
    gen = torch.Generator().manual_seed(tp * 100 + kv)
    q, k, v = (torch.randn(n * HD, 5, generator=gen) for n in (16, kv, kv))
    parts = [split_qkv(q, k, v, tp, r, HD) for r in range(tp)]
    assert all(
        torch.equal(a, b) for a, b in zip(merge_qkv(parts, 16, kv, HD), (q, k, v), strict=True)
    )


def test_vocab_split_pads_with_zero_rows_and_merge_drops_them():
    table = torch.randn(10, 3)
    parts = [split_vocab(table, 4, r) for r in range(4)]
    assert [p.shape[0] for p in parts] == [3, 3, 3, 3]
    assert torch.count_nonzero(parts[3][1:]) == 0
    assert torch.equal(merge_vocab(parts, 10), table)


def test_row_and_column_splits_take_contiguous_chunks():
    w = torch.arange(48.0).view(6, 8)
    assert torch.equal(split_column(w, 3, 1), w[2:4])
    assert torch.equal(split_row(w, 4, 3), w[:, 6:8])


def test_merges_refuse_shards_that_cannot_come_from_one_tensor():
    with pytest.raises(ShardMismatch, match="rank 1 differs"):
        merge_replicated([torch.ones(3), torch.zeros(3)], "norm")
    padded = [split_vocab(torch.ones(10, 2), 4, r) for r in range(4)]
    padded[3][2, 0] = 5.0
    with pytest.raises(ShardMismatch, match="pad rows 10..11 are not zero"):
        merge_vocab(padded, 10, "lm_head")
    q, k, v = heads_tensor(8), heads_tensor(2, offset=100), heads_tensor(2, offset=200)
    parts = [split_qkv(q, k, v, 4, r, HD) for r in range(4)]
    parts[1][2 * HD] += 1  # rank 1's copy of kv head 0
    with pytest.raises(ShardMismatch, match="KV head 0 on rank 1 is not a copy"):
        merge_qkv(parts, 8, 2, HD, "qkv")


@pytest.mark.parametrize("tp", [1, 2, 4, 8, 16])
def test_streaming_read_plans_compute_exactly_the_split_rules(tp):
    """What the streaming reader reads (pieces + pad) equals split_tensor on whole tensors."""
    plan = preset_plan("mixed")
    gen = torch.Generator().manual_seed(tp)
    source = {
        name: torch.randn(shape, generator=gen) for name, shape in hf_tensor_shapes(plan).items()
    }
    for rank in range(tp):
        for item in rank_tensors(plan, tp, 1, rank):
            rp = read_plan(plan, item, tp, rank)
            pieces = [
                source[p.source]
                if p.rows is None
                else source[p.source][p.rows][:, p.cols or slice(None)]
                for p in rp.pieces
            ]
            if rp.pad_rows:
                pieces.append(torch.zeros(rp.pad_rows, plan.hidden_size))
            streamed = torch.cat(pieces)
            names = item.rule.source_names(item.layer.index if item.layer else None)
            expected = split_tensor(item.rule, [source[n] for n in names], tp, rank, plan.head_dim)
            assert streamed.shape == item.shape and torch.equal(streamed, expected), item.name


def test_merge_tensor_dispatches_every_split_kind():
    plan = preset_plan("mixed")
    tp = 8
    gen = torch.Generator().manual_seed(0)
    source = {
        name: torch.randn(shape, generator=gen) for name, shape in hf_tensor_shapes(plan).items()
    }
    kinds = set()
    for item in rank_tensors(plan, tp, 1, 0):
        names = item.rule.source_names(item.layer.index if item.layer else None)
        parts = [
            split_tensor(item.rule, [source[n] for n in names], tp, r, plan.head_dim)
            for r in range(tp)
        ]
        merged = merge_tensor(
            item.rule,
            parts,
            vocab=plan.vocab_size,
            heads=plan.num_attention_heads,
            kv_heads=item.layer.kv_heads if item.layer else None,
            head_dim=plan.head_dim,
        )
        assert all(torch.equal(m, source[n]) for m, n in zip(merged, names, strict=True))
        kinds.add(item.rule.split)
    assert kinds == set(Split)

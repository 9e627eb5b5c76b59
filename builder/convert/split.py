"""Pure tensor-parallel split rules, one per `Split` kind, and their exact inverses.

`split_*` turn whole HF tensors into one TP rank's tensor; `merge_*` turn the list of all
ranks' tensors back into the HF tensors, bit for bit, and refuse shards that disagree (a
replicated tensor that differs between ranks, a duplicated KV head that is not a copy, a
non-zero vocabulary pad row). The index helpers (`chunk`, `kv_heads_of_rank`, `vocab_rows`)
are shared with the streaming reader, so what it reads is by construction what `split_*`
computes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from builder.arch.tensors import Split, TensorRule
from builder.errors import ParallelismError, UserError

if TYPE_CHECKING:
    import torch


class ShardMismatch(UserError):
    """Rank tensors that cannot be the split of one tensor."""


# ---- index helpers --------------------------------------------------------------------------
def chunk(length: int, tp: int, rank: int, what: str = "dimension") -> slice:
    """Rank `rank`'s range of `length` cut into `tp` equal contiguous chunks."""
    if length % tp:
        raise ParallelismError(f"{what} of size {length} cannot be split evenly over tp {tp}")
    size = length // tp
    return slice(rank * size, (rank + 1) * size)


def kv_heads_of_rank(kv_heads: int, tp: int, rank: int) -> range:
    """Global KV heads held by `rank`: a chunk when tp <= kv, else one head duplicated tp/kv times.

    Heads are duplicated consecutively (h0,h0,...,h1,h1,...), so rank r holds head r // (tp/kv).
    """
    if tp <= kv_heads:
        part = chunk(kv_heads, tp, rank, "KV heads")
        return range(part.start, part.stop)
    if tp % kv_heads:
        raise ParallelismError(f"tp {tp} is not a multiple of {kv_heads} KV heads")
    head = rank // (tp // kv_heads)
    return range(head, head + 1)


def vocab_rows(vocab: int, tp: int, rank: int) -> tuple[slice, int]:
    """(real rows of the vocabulary held by `rank`, zero rows appended) after padding to tp."""
    per = math.ceil(vocab / tp)
    start = min(rank * per, vocab)
    stop = min(start + per, vocab)
    return slice(start, stop), per - (stop - start)


def head_rows(heads: range | slice, head_dim: int) -> slice:
    return slice(heads.start * head_dim, heads.stop * head_dim)


# ---- split ---------------------------------------------------------------------------------
def split_replicated(tensor: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    return tensor


def split_column(tensor: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    return tensor[chunk(tensor.shape[0], tp, rank, "output features")]


def split_row(tensor: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    return tensor[:, chunk(tensor.shape[1], tp, rank, "input features")]


def split_vocab(tensor: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    import torch

    rows, pad = vocab_rows(tensor.shape[0], tp, rank)
    part = tensor[rows]
    if not pad:
        return part
    return torch.cat([part, part.new_zeros((pad, *tensor.shape[1:]))])


def split_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tp: int, rank: int, head_dim: int
) -> torch.Tensor:
    """Rank `rank`'s [q | k | v] block: its query heads, then its (possibly duplicated) KV heads."""
    import torch

    heads, kv_heads = q.shape[0] // head_dim, k.shape[0] // head_dim
    q_part = q[head_rows(chunk(heads, tp, rank, "attention heads"), head_dim)]
    kv = head_rows(kv_heads_of_rank(kv_heads, tp, rank), head_dim)
    return torch.cat([q_part, k[kv], v[kv]])


def split_tensor(
    rule: TensorRule, sources: Sequence[torch.Tensor], tp: int, rank: int, head_dim: int
) -> torch.Tensor:
    """Rank `rank`'s tensor for `rule` from its whole HF source tensor(s)."""
    if rule.split is Split.QKV:
        return split_qkv(*sources, tp=tp, rank=rank, head_dim=head_dim)
    (source,) = sources
    return _SPLITS[rule.split](source, tp, rank)


_SPLITS = {
    Split.REPLICATED: split_replicated,
    Split.COLUMN: split_column,
    Split.ROW: split_row,
    Split.VOCAB: split_vocab,
}


# ---- merge (exact inverses) ------------------------------------------------------------------
def merge_replicated(parts: Sequence[torch.Tensor], name: str = "tensor") -> torch.Tensor:
    import torch

    for rank, part in enumerate(parts[1:], start=1):
        if not torch.equal(part, parts[0]):
            raise ShardMismatch(f"{name}: replicated copy on rank {rank} differs from rank 0")
    return parts[0]


def merge_column(parts: Sequence[torch.Tensor], name: str = "tensor") -> torch.Tensor:
    import torch

    return torch.cat(list(parts), dim=0)


def merge_row(parts: Sequence[torch.Tensor], name: str = "tensor") -> torch.Tensor:
    import torch

    return torch.cat(list(parts), dim=1)


def merge_vocab(parts: Sequence[torch.Tensor], vocab: int, name: str = "tensor") -> torch.Tensor:
    import torch

    full = torch.cat(list(parts), dim=0)
    if full.shape[0] != math.ceil(vocab / len(parts)) * len(parts):
        raise ShardMismatch(
            f"{name}: {full.shape[0]} rows cannot be vocab {vocab} padded to tp {len(parts)}"
        )
    if torch.count_nonzero(full[vocab:]):
        raise ShardMismatch(
            f"{name}: vocabulary pad rows {vocab}..{full.shape[0] - 1} are not zero"
        )
    return full[:vocab]


def merge_qkv(
    parts: Sequence[torch.Tensor], heads: int, kv_heads: int, head_dim: int, name: str = "qkv"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, k, v) from every rank's [q | k | v]; duplicated KV heads must be identical copies."""
    import torch

    tp = len(parts)
    q_rows = heads // tp * head_dim
    kv_rows = len(kv_heads_of_rank(kv_heads, tp, 0)) * head_dim
    for rank, part in enumerate(parts):
        if part.shape[0] != q_rows + 2 * kv_rows:
            raise ShardMismatch(
                f"{name}: rank {rank} has {part.shape[0]} rows, expected {q_rows + 2 * kv_rows}"
            )
    q = torch.cat([p[:q_rows] for p in parts])
    k_parts = [p[q_rows : q_rows + kv_rows] for p in parts]
    v_parts = [p[q_rows + kv_rows :] for p in parts]
    return (
        q,
        _merge_kv(k_parts, kv_heads, f"{name} (k)"),
        _merge_kv(v_parts, kv_heads, f"{name} (v)"),
    )


def _merge_kv(parts: list[torch.Tensor], kv_heads: int, name: str) -> torch.Tensor:
    import torch

    tp = len(parts)
    if tp <= kv_heads:
        return torch.cat(parts)
    copies = tp // kv_heads
    heads = []
    for head in range(kv_heads):
        first = head * copies
        for rank in range(first + 1, first + copies):
            if not torch.equal(parts[rank], parts[first]):
                raise ShardMismatch(
                    f"{name}: KV head {head} on rank {rank} is not a copy of rank {first}'s"
                )
        heads.append(parts[first])
    return torch.cat(heads)


def merge_tensor(
    rule: TensorRule,
    parts: Sequence[torch.Tensor],
    *,
    vocab: int,
    heads: int,
    kv_heads: int | None,
    head_dim: int,
    name: str = "tensor",
) -> tuple[torch.Tensor, ...]:
    """The HF source tensor(s) of `rule` (one per source name) from all TP ranks' tensors."""
    if rule.split is Split.QKV:
        return merge_qkv(parts, heads, kv_heads, head_dim, name)
    if rule.split is Split.VOCAB:
        return (merge_vocab(parts, vocab, name),)
    merge = {Split.REPLICATED: merge_replicated, Split.COLUMN: merge_column, Split.ROW: merge_row}
    return (merge[rule.split](parts, name),)

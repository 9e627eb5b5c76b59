"""The progressive safetensors writer: valid files, exact sizes, on-the-fly digest, refusals."""

from __future__ import annotations

import errno
import os

import blake3
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from builder.io import safetensors_stream as sts
from builder.io.checkpoint import HFCheckpoint
from builder.io.safetensors_stream import (
    FileSpan,
    SafetensorsStreamWriter,
    SafetensorsWriteError,
    TensorSpec,
    as_bytes,
    file_size,
    header_specs,
    read_header,
)


def sample_tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {
        "b.weight": torch.randn(37, 19, generator=gen).to(torch.bfloat16),
        "a.norm": torch.randn(19, generator=gen),
        "c.fp8": torch.randn(5, 8, generator=gen).to(torch.float8_e4m3fn),
        "d.scale": torch.tensor([0.25]),
        "e.ids": torch.arange(7, dtype=torch.int64),
    }


def specs_of(tensors: dict[str, torch.Tensor]) -> list[TensorSpec]:
    return [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]


def test_written_file_loads_with_safetensors_and_hash_matches(tmp_path):
    tensors = sample_tensors()
    path = tmp_path / "x.safetensors"
    with SafetensorsStreamWriter(path, specs_of(tensors), {"format": "pt"}) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
    loaded = load_file(path)
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype
        assert torch.equal(loaded[name].view(torch.uint8), tensor.view(torch.uint8))
    assert (
        writer.result.size == path.stat().st_size == file_size(specs_of(tensors), {"format": "pt"})
    )
    assert writer.result.digest == blake3.blake3(path.read_bytes()).hexdigest()
    with safe_open(str(path), "pt") as handle:
        assert handle.metadata() == {"format": "pt"}


def test_row_blocks_and_raw_bytes_give_the_same_file_as_whole_tensors(tmp_path):
    tensors = sample_tensors()
    whole, blocks = tmp_path / "whole.safetensors", tmp_path / "blocks.safetensors"
    with SafetensorsStreamWriter(whole, specs_of(tensors)) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
    with SafetensorsStreamWriter(blocks, specs_of(tensors)) as writer:
        for name, tensor in tensors.items():
            rows = list(tensor.split(3)) if tensor.dim() == 2 else [tensor]
            writer.write_blocks(name, [as_bytes(r) if i % 2 else r for i, r in enumerate(rows)])
    assert whole.read_bytes() == blocks.read_bytes()


def test_header_is_8_aligned_and_reads_back(tmp_path):
    tensors = sample_tensors()
    path = tmp_path / "x.safetensors"
    save_file(tensors, str(path))
    start, header = read_header(path)
    assert {s.name: (s.shape, s.dtype) for s in header_specs(header)} == {
        n: (tuple(t.shape), t.dtype) for n, t in tensors.items()
    }
    ours = sts.encode_header(specs_of(tensors))
    assert len(ours) % 8 == 0 and start > 8


@pytest.mark.parametrize(
    "action, message",
    [
        (lambda w, t: w.write("a.norm", t["a.norm"]), "next tensor is 'b.weight'"),
        (lambda w, t: w.write("b.weight", t["b.weight"].float()), "header says"),
        (lambda w, t: w.write("b.weight", t["b.weight"][:3]), "header says"),
        (
            lambda w, t: (w.start("b.weight"), w.append(torch.zeros(40, 19, dtype=torch.bfloat16))),
            "more than",
        ),
        (lambda w, t: (w.start("b.weight"), w.finish()), "bytes short"),
        (lambda w, t: w.write("b.weight", t["b.weight"]), "closed before tensor 'a.norm'"),
    ],
)
def test_misuse_is_refused_and_leaves_no_file(tmp_path, action, message):
    tensors = sample_tensors()
    path = tmp_path / "x.safetensors"
    writer = SafetensorsStreamWriter(path, specs_of(tensors))
    with pytest.raises(SafetensorsWriteError, match=message), writer:
        action(writer, tensors)
    assert not path.exists()


def test_duplicate_names_are_refused(tmp_path):
    spec = TensorSpec("x", (2,), torch.float32)
    with pytest.raises(SafetensorsWriteError, match="appears twice"):
        SafetensorsStreamWriter(tmp_path / "x.safetensors", [spec, spec])


def test_disk_full_removes_the_partial_file(tmp_path, monkeypatch):
    tensors = sample_tensors()
    path = tmp_path / "x.safetensors"
    real_write, written = sts.os.write, []

    def filling_write(fd, data):
        if sum(written) > 600:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(real_write(fd, data))
        return written[-1]

    monkeypatch.setattr(sts.os, "write", filling_write)
    writer = SafetensorsStreamWriter(path, specs_of(tensors))
    with pytest.raises(SafetensorsWriteError, match="No space left on device"), writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
    assert not path.exists()


@pytest.mark.parametrize("inline", [False, True], ids=["kernel copy", "cache-sized spans"])
def test_file_spans_are_copied_and_hashed(tmp_path, monkeypatch, inline):
    """Large spans are copied in the kernel (hashed on a side thread); spans up to
    _INLINE_SPAN are written and hashed from their (cache-hot) view. Same bytes, same digest."""
    monkeypatch.setattr(sts, "_INLINE_SPAN", 1 << 30 if inline else 0)
    tensors = sample_tensors()
    (tmp_path / "src").mkdir()
    source = tmp_path / "src" / "model.safetensors"
    save_file(tensors, str(source))
    ckpt = HFCheckpoint(tmp_path / "src")
    copied = []
    real_copy = sts.os.copy_file_range
    monkeypatch.setattr(sts.os, "copy_file_range", lambda *a: copied.append(a[2]) or real_copy(*a))
    raw = source.read_bytes()
    path = tmp_path / "x.safetensors"
    fd = os.open(source, os.O_RDONLY)
    try:
        with SafetensorsStreamWriter(path, specs_of(tensors)) as writer:
            for name in tensors:
                _, offset, size = ckpt.data_location(name)
                writer.write_blocks(
                    name, [FileSpan(fd, offset, memoryview(raw)[offset : offset + size])]
                )
    finally:
        os.close(fd)
    data_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    assert sum(copied) == (0 if inline else data_bytes)
    loaded = load_file(path)
    assert all(
        torch.equal(loaded[n].view(torch.uint8), t.view(torch.uint8)) for n, t in tensors.items()
    )
    assert writer.result.digest == blake3.blake3(path.read_bytes()).hexdigest()


def test_checkpoint_data_location_points_at_the_tensor_bytes(tmp_path):
    tensors = sample_tensors()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    ckpt = HFCheckpoint(tmp_path)
    raw = (tmp_path / "model.safetensors").read_bytes()
    for name, tensor in tensors.items():
        _, offset, size = ckpt.data_location(name)
        assert raw[offset : offset + size] == bytes(as_bytes(tensor))

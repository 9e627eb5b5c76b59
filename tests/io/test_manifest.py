"""File digests of manifest.json: BLAKE3 for new entries, older sha256 entries still verify,
and a changed byte is caught by either."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import blake3
import pytest

from builder.io.manifest import (
    DIGEST,
    build_manifest,
    digest_problem,
    entry_digest,
    file_entry,
    verify_files,
)


def flip_byte(path: Path, offset: int = 3) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def sha256_manifest(directory: Path) -> dict:
    """A manifest as builder wrote them before BLAKE3: {"size", "sha256"} per file."""
    files = {
        p.name: {"size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
        for p in sorted(directory.iterdir())
    }
    return {"kind": "hf-checkpoint", "files": files}


@pytest.fixture
def directory(tmp_path) -> Path:
    (tmp_path / "a.bin").write_bytes(bytes(range(256)) * 4097)  # more than one hash chunk of
    (tmp_path / "b.json").write_text(json.dumps({"x": 1}))  # BLAKE3's 1 KiB tree
    return tmp_path


def test_new_entries_record_blake3_of_the_bytes(directory):
    entry = file_entry(directory / "a.bin")
    assert DIGEST == "blake3" and set(entry) == {"size", "blake3"}
    assert entry["blake3"] == blake3.blake3((directory / "a.bin").read_bytes()).hexdigest()
    assert entry_digest(entry) == ("blake3", entry["blake3"])
    assert verify_files(directory, build_manifest(directory, "x")) == []


def test_a_flipped_byte_is_caught_by_blake3(directory):
    manifest = build_manifest(directory, "x")
    flip_byte(directory / "a.bin")
    assert verify_files(directory, manifest) == [
        f"{directory / 'a.bin'}: blake3 differs from the manifest"
    ]


def test_an_older_sha256_manifest_still_verifies_and_catches_a_flipped_byte(directory):
    manifest = sha256_manifest(directory)
    assert verify_files(directory, manifest) == []
    flip_byte(directory / "b.json", 0)
    assert verify_files(directory, manifest) == [
        f"{directory / 'b.json'}: sha256 differs from the manifest"
    ]


def test_an_entry_without_a_known_digest_is_a_problem_not_a_pass(directory):
    path = directory / "a.bin"
    for entry in ({"size": 1}, {"size": 1, "md5": "00"}, {"size": 1, "blake3": ""}):
        assert entry_digest(entry) is None
        assert "records no digest" in digest_problem(path, entry)

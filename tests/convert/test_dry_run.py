"""--dry-run: the manifest of what would be written, from a preset (no weights) or headers."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from builder.cli import main

GIB = 2**30


def dry_run(args, tmp_path):
    out = tmp_path / "plan"
    result = CliRunner().invoke(main, ["convert", *args, "--dry-run", str(out)])
    assert result.exit_code == 0, result.output
    return json.loads((out / "manifest.json").read_text()), out


# Per-rank GiB: TP8 62.4 and TP4 120.9 are trtllm-checkpoint.md §9; TP16 by hand: 64 layers x
# (2h²/16 + 2·128·h for the duplicated k/v head) + 212.689 B MLP/16 + lm_head/16 + embedding.
@pytest.mark.parametrize(
    "tp, qkv_rows, lm_head_rows, rank_gib",
    [(8, 2304, 16032, 62.43), (4, 4608, 32064, 120.94), (16, 1280, 8016, 33.42)],
)
def test_ultra_preset_dry_run_lists_every_rank_tensor(
    tmp_path, tp, qkv_rows, lm_head_rows, rank_gib
):
    manifest, out = dry_run(["--preset", "ultra-253b", "--tp", str(tp)], tmp_path)
    assert [p.name for p in out.iterdir()] == ["manifest.json"]  # no weights, no config.json
    assert manifest["kind"] == "trtllm-checkpoint-dry-run" and manifest["complete"] is False
    assert manifest["layout"]["tp"] == tp and manifest["config"]["mapping"]["tp_size"] == tp
    ranks = manifest["ranks"]
    assert len(ranks) == tp
    for rank in ranks:
        specs = rank["tensor_specs"]
        assert rank["tensors"] == len(specs) == 519  # 64 x 3 + 81 x 4 + 3 (ref. §3, BF16)
        assert specs["transformer.layers.0.attention.qkv.weight"] == {
            "dtype": "BF16",
            "shape": [qkv_rows, 16384],
            "bytes": qkv_rows * 16384 * 2,
        }
        assert specs["lm_head.weight"]["shape"] == [lm_head_rows, 16384]
        assert specs["transformer.layers.134.ffn.fc.weight"]["shape"] == [425984 // tp, 16384]
        assert specs["transformer.layers.134.ffn.proj.weight"]["shape"] == [16384, 425984 // tp]
        assert specs["transformer.vocab_embedding.weight"]["shape"] == [128256, 16384]
        assert not any(name.startswith("transformer.layers.9.") for name in specs)  # empty layer
        assert rank["bytes"] / GIB == pytest.approx(rank_gib, abs=0.01)
        assert 0 < rank["bytes"] - rank["data_bytes"] < 2**20  # the header
    assert manifest["totals"]["largest_slice_bytes"] == 128256 * 16384 * 2  # the embedding


def test_ultra_dry_run_with_pipeline_stages_uses_local_layer_indices(tmp_path):
    manifest, _ = dry_run(["--preset", "ultra-253b", "--tp", "8", "--pp", "2"], tmp_path)
    first, last = manifest["ranks"][0], manifest["ranks"][8]
    assert first["layers"] == [0, 80] and last["layers"] == [81, 161]
    assert "transformer.vocab_embedding.weight" in first["tensor_specs"]
    assert "lm_head.weight" not in first["tensor_specs"]
    assert (
        "lm_head.weight" in last["tensor_specs"]
        and "transformer.ln_f.weight" in last["tensor_specs"]
    )
    # global layer 134 is local layer 134 - 81 = 53 in stage 1
    assert last["tensor_specs"]["transformer.layers.53.ffn.fc.weight"]["shape"] == [53248, 16384]


def test_dry_run_from_headers_predicts_the_real_files_exactly(tmp_path, mixed_ckpt):
    manifest, _ = dry_run([str(mixed_ckpt), "--tp", "4", "--pp", "2"], tmp_path)
    assert manifest["source"]["fingerprint"]
    real = tmp_path / "real"
    result = CliRunner().invoke(
        main, ["convert", str(mixed_ckpt), str(real), "--tp", "4", "--pp", "2", "--json"]
    )
    assert result.exit_code == 0, result.output
    for rank in manifest["ranks"]:
        assert (real / rank["file"]).stat().st_size == rank["bytes"]
    written = json.loads((real / "manifest.json").read_text())
    assert written["source"]["fingerprint"] == manifest["source"]["fingerprint"]
    assert [r["tensor_specs"] for r in written["ranks"]] == [
        r["tensor_specs"] for r in manifest["ranks"]
    ]


def test_preset_without_dry_run_is_refused(tmp_path):
    result = CliRunner().invoke(
        main, ["convert", "--preset", "mixed", "--tp", "2", str(tmp_path / "x")]
    )
    assert result.exit_code == 2 and "only with --dry-run" in result.output

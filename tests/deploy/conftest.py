"""Checkpoints for the build tests: real `builder convert` output of the mixed test model."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from builder.convert import convert_checkpoint
from builder.convert.layout import Fp8Layout

TP = 2
FP8_QUANTIZATION = {
    "quant_algo": "FP8",
    "kv_cache_quant_algo": "FP8",
    "exclude_modules": ["lm_head"],
}


class WeightScaleFp8(Fp8Layout):
    """FP8 rank tensors with real per-tensor weight scales (amax / 448).

    No calibration runs in these tests, so activation and KV scales are 1.0: the checkpoint
    is structurally what `builder quantize` writes (dtypes, names, config), which is all that
    `builder build` reads; it is never used to judge accuracy.
    """

    def apply(self, item, tensor):
        out, scale = [], None
        for spec in self.specs(item, tensor.dtype):
            if spec.name == item.name and spec.dtype == torch.float8_e4m3fn:
                scale = tensor.abs().max().float().clamp(min=1e-12) / 448
                out.append((spec.name, (tensor.float() / scale).to(torch.float8_e4m3fn)))
            elif spec.name == item.name:
                out.append((spec.name, tensor))
            elif spec.name.endswith("weights_scaling_factor"):
                out.append((spec.name, scale.reshape(1)))
            else:
                out.append((spec.name, torch.ones(1, dtype=torch.float32)))
        return out


@pytest.fixture(scope="session")
def trtllm_bf16(mixed_ckpt, tmp_path_factory):
    """BF16 TensorRT-LLM checkpoint of the mixed model at tp=2 (builder convert)."""
    out = tmp_path_factory.mktemp("trtllm") / "mixed-bf16-tp2"
    convert_checkpoint(mixed_ckpt, out, tp=TP)
    return out


@pytest.fixture(scope="session")
def trtllm_fp8(mixed_ckpt, tmp_path_factory):
    """FP8 (weights + KV) TensorRT-LLM checkpoint of the mixed model at tp=2."""
    out = tmp_path_factory.mktemp("trtllm") / "mixed-fp8-tp2"
    convert_checkpoint(
        mixed_ckpt,
        out,
        tp=TP,
        transform=WeightScaleFp8(FP8_QUANTIZATION),
        quantization=FP8_QUANTIZATION,
    )
    return out


@pytest.fixture(scope="session")
def hf_fp8_dir(mixed_ckpt, tmp_path_factory):
    """An HF directory declaring ModelOpt's unified FP8 format (hf_quant_config.json).

    Only the declaration matters to `build --backend pytorch`, which never reads weights.
    """
    out = tmp_path_factory.mktemp("hf") / "mixed-fp8"
    shutil.copytree(mixed_ckpt, out)
    (out / "manifest.json").unlink(missing_ok=True)
    quant = {
        "producer": {"name": "modelopt", "version": "0.47.0"},
        "quantization": FP8_QUANTIZATION,
    }
    (out / "hf_quant_config.json").write_text(json.dumps(quant, indent=2))
    return out


def copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return dst

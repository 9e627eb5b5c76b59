"""FP8 quantization with NVIDIA ModelOpt: block-by-block calibration, two exports.

Public API (other stages and the demo call these; ModelOpt is imported lazily):
- `quantize(QuantizeRequest(src, out, tp=1, pp=1, kv_cache=True, calib="builtin",
  calib_size=512, calib_seq_len=512, formats=("trtllm", "hf"), device="cpu", ...),
  progress=None, block_progress=None)` -> QuantizeSummary; `quantize_checkpoint(src, out,
  **fields)` builds the request for scripts and tests; EXPORTERS: the export formats
  (paths, timings, peak memory, per-layer amax table; `.to_json()`)
- FP8 accuracy against BF16 (`evaluate_accuracy`, `format_table`) lives in
  builder.verify.fp8_accuracy: it runs verify's metrics, a layer above quantize
- `build_calibration_set(dataset, tokenizer, size, seq_len, seed)` -> CalibrationSet
- `AmaxTable`, `calibrate_blockwise`, `calibrate_model`, `write_unified_hf`,
  `write_trtllm_fp8`, `Fp8Transform` for finer control
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "quantize": "builder.quantize.pipeline",
    "quantize_checkpoint": "builder.quantize.pipeline",
    "QuantizeRequest": "builder.quantize.pipeline",
    "EXPORTERS": "builder.quantize.exporters",
    "QuantizeSummary": "builder.quantize.pipeline",
    "build_calibration_set": "builder.quantize.calib",
    "CalibrationSet": "builder.quantize.calib",
    "AmaxTable": "builder.quantize.amax",
    "calibrate_blockwise": "builder.quantize.blockwise",
    "calibrate_model": "builder.quantize.blockwise",
    "CalibOptions": "builder.quantize.blockwise",
    "write_unified_hf": "builder.quantize.export_hf",
    "write_trtllm_fp8": "builder.quantize.export_trtllm",
    "Fp8Transform": "builder.quantize.export_trtllm",
}

__all__ = [
    "EXPORTERS",
    "AmaxTable",
    "CalibOptions",
    "CalibrationSet",
    "Fp8Transform",
    "QuantizeRequest",
    "QuantizeSummary",
    "build_calibration_set",
    "calibrate_blockwise",
    "calibrate_model",
    "quantize",
    "quantize_checkpoint",
    "write_trtllm_fp8",
    "write_unified_hf",
]


def __getattr__(name: str) -> Any:
    # Lazy: `builder --help` and the calibration-data helpers must not import ModelOpt.
    if name not in _EXPORTS:
        raise AttributeError(f"module 'builder.quantize' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)

"""ModelOpt's FP8 recipe and the small amount of glue around `mtq.quantize`.

FP8_DEFAULT_CFG: per-tensor E4M3 weights and inputs of every linear except lm_head, max
calibration. FP8_KV_CFG adds the K and V bmm quantizers (a calibrated FP8 KV cache; the
`_cast` variant that pins amax to 448 is deliberately not used).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """ModelOpt prints its config and per-module notes to stdout; keep our output readable."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def mtq() -> Any:
    with quiet():
        import modelopt.torch.quantization as module
    return module


def fp8_config(kv_cache: bool) -> dict[str, Any]:
    quant = mtq()
    if not kv_cache:
        return quant.FP8_DEFAULT_CFG
    with quiet():
        return quant.update_quant_cfg_with_kv_cache_quant(
            quant.FP8_DEFAULT_CFG, quant.FP8_KV_CFG["quant_cfg"]
        )


def register_attention(model: torch.nn.Module) -> None:
    """Let ModelOpt wrap the model's attention class with K/V quantizers.

    ModelOpt registers HF attention classes only while converting a whole PreTrainedModel;
    block-by-block calibration converts lone decoder layers, so it registers them up front
    from a (meta-device) skeleton of the model.
    """
    with quiet():
        from modelopt.torch.quantization.plugins.huggingface import (
            register_hf_attentions_on_the_fly,
        )

        register_hf_attentions_on_the_fly(model)


def quantize(
    module: torch.nn.Module, kv_cache: bool, forward_loop: Callable[[torch.nn.Module], None]
) -> torch.nn.Module:
    """`mtq.quantize` with the FP8 recipe; the forward loop is mandatory (else no input amax)."""
    with quiet(), torch.no_grad():
        return mtq().quantize(module, fp8_config(kv_cache), forward_loop)

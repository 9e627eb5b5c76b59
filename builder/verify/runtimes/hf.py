"""`hf`: a unified HF FP8 checkpoint (ModelOpt's export format) run by builder's reference model.

An independent check of that export: not the TensorRT-LLM checkpoint and not the executor's
code. Each block of the reference model is built and its linears replaced by `Fp8Linear`s
holding the export's own tensors: the E4M3 weight dequantized once (weight x weight_scale), the
input rounded through E4M3 with input_scale before the matmul (ModelOpt's fake-quant
semantics; W8A16 linears dequantize their INT8 weight and leave the input as it is); with a
quantized KV cache, keys and values are rounded through E4M3 with k_scale / v_scale after RoPE
and the cache update, as ModelOpt's KV quantizers do. Embedding, norms and lm_head are used as
stored. Blocks stream one at a time (builder.verify.stream).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from builder.arch.plan import LayerPlan
from builder.arch.tensors import (
    HF_INPUT_SCALE,
    WEIGHT,
    cache_roles,
    hf_attention_module,
    hf_kv_scale_name,
    hf_layer_prefix,
    hf_scale_names,
)
from builder.dtypes import FP8_MAX
from builder.errors import UserError
from builder.quantize.blockwise import _fill
from builder.verify.runtimes.base import (
    ArtifactInfo,
    Capabilities,
    directory_sha256,
    read_json,
    scores_from_logits,
)
from builder.verify.sampling import Sampler, Sampling
from builder.verify.stream import BlockStream, Sequence, continue_sequences

TOKEN_AMAX_FLOOR = 1e-12  # an all-zero token row gets a harmless scale, not a division by 0


def e4m3_round_trip(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale clamped to +-448, rounded to E4M3, times scale (float32)."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * scale


class Fp8Linear(nn.Module):
    """y = round_e4m3(x / input_scale) * input_scale @ (W_e4m3 * weight_scale).T"""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, input_scale: torch.Tensor):
        super().__init__()
        self.register_buffer("dequantized", weight.float() * weight_scale.float())
        self.register_buffer(HF_INPUT_SCALE, input_scale.float().reshape(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(e4m3_round_trip(x, self.input_scale), self.dequantized).to(x.dtype)


class RowwiseFp8Linear(nn.Module):
    """Per-channel weights, per-token activations (ModelOpt FP8_PER_CHANNEL_PER_TOKEN fake
    quant): y = round_e4m3(x / s_tok) * s_tok @ (W_e4m3 * weight_scale[:, None]).T, with
    s_tok = amax(|x|) / 448 over each token's row."""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor):
        super().__init__()
        self.register_buffer("dequantized", weight.float() * weight_scale.float()[:, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s_tok = x.float().abs().amax(dim=-1, keepdim=True).clamp(min=TOKEN_AMAX_FLOOR) / FP8_MAX
        return F.linear(e4m3_round_trip(x, s_tok), self.dequantized).to(x.dtype)


class Int8WeightOnlyLinear(nn.Module):
    """W8A16 (ModelOpt int8_wo, as TensorRT-LLM's weight-only GEMM computes it): y = x @
    (W_int8 * weight_scale[:, None]).T, activations unquantized."""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor):
        super().__init__()
        self.register_buffer("dequantized", weight.float() * weight_scale.float()[:, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.dequantized).to(x.dtype)


QUANTIZED = (Fp8Linear, RowwiseFp8Linear, Int8WeightOnlyLinear)


def export_linear(ckpt: Any, module: str, index: int) -> nn.Module | None:
    """The export's linear `module` by what it stores: E4M3 with a scalar weight scale and an
    input scale (per-tensor FP8), E4M3 with an [out] weight scale and no input scale
    (per-channel per-token), INT8 with an [out] weight scale (W8A16), or a plain weight (left
    unquantized: None, filled as usual)."""
    weight = _read(ckpt, f"{module}.{WEIGHT}", index)
    w_name, x_name = hf_scale_names(module)
    if weight.dtype == torch.int8:
        w_scale = _read(ckpt, w_name, index)
        if tuple(w_scale.shape) != (weight.shape[0],):
            raise UserError(
                f"{ckpt.root}: {w_name} has shape {list(w_scale.shape)}; an int8 (W8A16) "
                f"weight needs [{weight.shape[0]}]"
            )
        return Int8WeightOnlyLinear(weight, w_scale)
    if weight.dtype != torch.float8_e4m3fn:
        return None
    w_scale = _read(ckpt, w_name, index)
    if w_scale.dim() == 1 and w_scale.shape[0] == weight.shape[0]:
        return RowwiseFp8Linear(weight, w_scale)
    if w_scale.numel() != 1:
        raise UserError(
            f"{ckpt.root}: {w_name} has shape {list(w_scale.shape)}; expected a "
            f"scalar (per-tensor) or [{weight.shape[0]}] (per-channel)"
        )
    return Fp8Linear(weight, w_scale, _read(ckpt, x_name, index))


def fp8_block(stream: BlockStream, index: int) -> nn.Module:
    """Block `index` of the export: norms filled, linears replaced by Fp8Linear, KV scales set."""
    layer = stream.parts.layer(index, stream.dtype)
    prefix = hf_layer_prefix(index)
    ckpt = stream.ckpt
    for name, module in list(layer.named_modules()):
        if isinstance(module, nn.Linear):
            replacement = export_linear(ckpt, f"{prefix}{name}", index)
            if replacement is not None:
                parent_name, leaf = name.rsplit(".", 1)
                setattr(layer.get_submodule(parent_name), leaf, replacement.to(stream.device))
    for module in layer.modules():  # what is left on the meta device: the norms
        if not isinstance(module, QUANTIZED) and any(
            p.is_meta for p in module.parameters(recurse=False)
        ):
            module.to_empty(device=stream.device, recurse=False)
    with torch.no_grad():
        for name, tensor in layer.named_parameters():
            _fill(tensor, ckpt, prefix + name, index)
    kv_scales = [hf_kv_scale_name(role, index) for role in cache_roles()]
    attention = stream.plan.layers[index].has_kv_cache
    if attention and kv_scales[0] in ckpt:
        attn = layer.get_submodule(hf_attention_module(index).removeprefix(prefix))
        attn.fp8_kv_scales = tuple(
            _read(ckpt, name, index).float().to(stream.device) for name in kv_scales
        )
    return layer.eval()


def _read(ckpt: Any, name: str, index: int) -> torch.Tensor:
    if name not in ckpt:
        raise UserError(
            f"{ckpt.root}: tensor {name!r} (layer {index}) is missing: not a unified HF FP8 export?"
        )
    return ckpt.read(name)


class _KvRounding:
    """Stands in for transformers' attention-function registry in builder.model.modeling: the
    attention function it hands out rounds K and V through E4M3 for modules with fp8_kv_scales."""

    def __init__(self, registry: Any):
        self.registry = registry

    def get_interface(self, name: str, default: Any) -> Any:
        inner = self.registry.get_interface(name, default)

        def attend(module, query, key, value, *args, **kwargs):
            scales = getattr(module, "fp8_kv_scales", None)
            if scales is not None:
                key = e4m3_round_trip(key, scales[0]).to(query.dtype)
                value = e4m3_round_trip(value, scales[1]).to(query.dtype)
            return inner(module, query, key, value, *args, **kwargs)

        return attend


@contextmanager
def fp8_kv_attention() -> Iterator[None]:
    """The reference model's attention resolves ALL_ATTENTION_FUNCTIONS from its module globals
    at call time (so ModelOpt can wrap it); the hf runtime wraps it the same way while it runs."""
    from builder.model import modeling

    original = modeling.ALL_ATTENTION_FUNCTIONS
    modeling.ALL_ATTENTION_FUNCTIONS = _KvRounding(original)
    try:
        yield
    finally:
        modeling.ALL_ATTENTION_FUNCTIONS = original


# Per-tensor, per-channel-per-token, W8A16 and ModelOpt's MIXED_PRECISION (builder.arch.formats).
HF_ALGOS = ("FP8", "FP8_PER_CHANNEL_PER_TOKEN", "W8A16", "MIXED_PRECISION")


def check_hf_fp8(path: Path) -> dict[str, Any]:
    config = read_json(path / "config.json")
    algo = (config.get("quantization_config") or {}).get("quant_algo") or (
        read_json(path / "hf_quant_config.json").get("quantization", {}).get("quant_algo")
        if (path / "hf_quant_config.json").is_file()
        else None
    )
    if algo not in HF_ALGOS:
        raise UserError(
            f"{path}: not a unified HF FP8 checkpoint (quant_algo {algo!r}); the hf runtime "
            "reads ModelOpt's FP8 export (builder quantize OUT/hf)"
        )
    return config


class HfFp8Runtime:
    name = "hf"

    def __init__(
        self,
        artifact: str | Path,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        top_k: int = 20,
    ):
        self.path = Path(artifact)
        check_hf_fp8(self.path)
        self.stream = BlockStream(
            self.path, dtype, device, loader=fp8_block, forward_context=fp8_kv_attention
        )
        self.plan = self.stream.plan
        self.device, self.top_k = device, top_k
        self._head = self.stream.head_weights()
        kv = any(
            hf_kv_scale_name(role, layer.index) in self.stream.ckpt
            for layer in self.stream.plan.layers
            if layer.has_kv_cache
            for role in cache_roles()
        )
        self.artifact = ArtifactInfo(
            str(self.path.resolve()), "hf-fp8", directory_sha256(self.path), {"kv_cache_fp8": kv}
        )
        self.capabilities = Capabilities(
            prompt_scores=True,
            full_distribution=True,
            greedy=True,
            localize=True,
            top_k=top_k,
            notes=(
                (
                    "builder reference model with the export's FP8 weights and scales "
                    "(dequantized), "
                    f"{str(dtype).removeprefix('torch.')} on {device}, block-streamed"
                ),
            ),
        )

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        seq = Sequence(torch.empty(0, dtype=torch.long))
        hidden = self.stream.forward([seq], [ids])[0]
        return self.stream.head(hidden, self._head).cpu()

    def score(self, ids: torch.Tensor, golden_top_ids: torch.Tensor | None = None):
        return scores_from_logits(self.logits(ids), ids, self.top_k, golden_top_ids)

    def generate(
        self, prompt_ids: torch.Tensor, sampling: Sampling, eos_id: int | None = None
    ) -> list[int]:
        """KV-cached: the prompt in one pass, then one pass per new token (the golden's loop)."""
        if sampling.max_tokens == 0:
            return []
        seq = Sequence(torch.empty(0, dtype=torch.long))
        hidden = self.stream.forward([seq], [prompt_ids], use_cache=True)[0]
        first = self.stream.head(hidden, self._head)[-1]
        return continue_sequences(
            self.stream, [seq], [first], [Sampler(sampling)], self._head, eos_id
        )[0]

    def localizer(self) -> HfLocalizer:
        return HfLocalizer(self)

    def close(self) -> None:
        pass


class HfLocalizer:
    def __init__(self, runtime: HfFp8Runtime):
        self.runtime = runtime
        self.stream = runtime.stream
        self.plan = self.stream.plan

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.stream.embed(ids)[0]

    def block(self, layer: LayerPlan, x: torch.Tensor) -> torch.Tensor:
        block = fp8_block(self.stream, layer.index)
        return self.stream.run_block(block, x[None].to(self.stream.device, self.stream.dtype))[0]

    def logits(self, final: torch.Tensor) -> torch.Tensor:
        return self.stream.head(
            final[None].to(self.stream.device, self.stream.dtype), self.runtime._head
        )

    def tensor_findings(self, part: int | str, checks) -> list[str]:
        from builder.verify.localize import hf_tensor_findings

        return hf_tensor_findings(self.stream, part, checks)

    def integrity(self) -> list[str]:
        from builder.verify.localize import manifest_findings

        return manifest_findings(self.runtime.path)


def has_kv(layer: LayerPlan) -> bool:
    return layer.has_kv_cache

"""The tensors of the in-flight batching repository, as data: one table per model, and the
ensemble's wiring between them.

Names, dtypes and dims follow TensorRT-LLM 1.2.x `triton_backend/all_models/
inflight_batcher_llm/*/config.pbtxt` (the text-LLM subset: no multimodal, encoder-decoder,
LoRA or speculative-decoding tensors). `LOGITS`, `ENCODER_FEATURES` and `PROMPT_TABLE` are
dtypes resolved per repository (the typed fields users most often leave unfilled).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from builder.triton.pbtxt import Enum

LOGITS = "LOGITS"
ENCODER_FEATURES = "ENCODER_FEATURES"
PROMPT_TABLE = "PROMPT_TABLE"


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str  # a Triton DataType name (TYPE_INT32, ...) or one of the symbolic dtypes above
    dims: tuple[int, ...]
    optional: bool = False
    scalar: bool = False  # `reshape: { shape: [ ] }`: the backend reads a [1] input as a scalar
    ragged: bool = False  # allow_ragged_batch

    def config(self, dtypes: dict[str, str]) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "name": self.name,
            "data_type": Enum(dtypes.get(self.dtype, self.dtype)),
            "dims": list(self.dims),
        }
        if self.scalar:
            entry["reshape"] = {"shape": []}
        if self.optional:
            entry["optional"] = True
        if self.ragged:
            entry["allow_ragged_batch"] = True
        return entry


def _t(name: str, dtype: str, *dims: int, **flags: bool) -> Tensor:
    return Tensor(name, dtype, tuple(dims), **flags)


def _opt(name: str, dtype: str, *dims: int, **flags: bool) -> Tensor:
    return Tensor(name, dtype, tuple(dims), optional=True, **flags)


def _opt_scalar(name: str, dtype: str) -> Tensor:
    return Tensor(name, dtype, (1,), optional=True, scalar=True)


# ---- the public text interface (ensemble and tensorrt_llm_bls)
# -------------------------------------
TEXT_INPUTS = (
    _t("text_input", "TYPE_STRING", 1),
    _t("max_tokens", "TYPE_INT32", 1),
    _opt("bad_words", "TYPE_STRING", -1),
    _opt("stop_words", "TYPE_STRING", -1),
    _opt("exclude_input_in_output", "TYPE_BOOL", 1),
    _opt("end_id", "TYPE_INT32", 1),
    _opt("pad_id", "TYPE_INT32", 1),
    _opt("top_k", "TYPE_INT32", 1),
    _opt("top_p", "TYPE_FP32", 1),
    _opt("temperature", "TYPE_FP32", 1),
    _opt("length_penalty", "TYPE_FP32", 1),
    _opt("repetition_penalty", "TYPE_FP32", 1),
    _opt("min_tokens", "TYPE_INT32", 1),
    _opt("presence_penalty", "TYPE_FP32", 1),
    _opt("frequency_penalty", "TYPE_FP32", 1),
    _opt("seed", "TYPE_UINT64", 1),
    _opt("return_log_probs", "TYPE_BOOL", 1),
    _opt("return_context_logits", "TYPE_BOOL", 1),
    _opt("return_generation_logits", "TYPE_BOOL", 1),
    _opt("num_return_sequences", "TYPE_INT32", 1),
    _opt("beam_width", "TYPE_INT32", 1),
    _opt("stream", "TYPE_BOOL", 1),
)
TEXT_OUTPUTS = (
    _t("text_output", "TYPE_STRING", -1),
    _t("cum_log_probs", "TYPE_FP32", -1),
    _t("output_log_probs", "TYPE_FP32", -1, -1),
    _t("context_logits", LOGITS, -1, -1),
    _t("generation_logits", LOGITS, -1, -1, -1),
    _t("batch_index", "TYPE_INT32", 1),
    _t("sequence_index", "TYPE_INT32", 1),
)

# ---- preprocessing: text -> token ids
# ------------------------------------------------------------------
PREPROCESSING_INPUTS = (
    _t("QUERY", "TYPE_STRING", 1),
    _t("REQUEST_OUTPUT_LEN", "TYPE_INT32", 1),
    _opt("BAD_WORDS_DICT", "TYPE_STRING", -1),
    _opt("STOP_WORDS_DICT", "TYPE_STRING", -1),
    _opt("END_ID", "TYPE_INT32", 1),
    _opt("PAD_ID", "TYPE_INT32", 1),
)
PREPROCESSING_OUTPUTS = (
    _t("INPUT_ID", "TYPE_INT32", -1),
    _t("REQUEST_INPUT_LEN", "TYPE_INT32", 1),
    _t("BAD_WORDS_IDS", "TYPE_INT32", 2, -1),
    _t("STOP_WORDS_IDS", "TYPE_INT32", 2, -1),
    _t("REQUEST_OUTPUT_LEN", "TYPE_INT32", -1),
    _t("OUT_END_ID", "TYPE_INT32", 1),
    _t("OUT_PAD_ID", "TYPE_INT32", 1),
)

# ---- tensorrt_llm: the in-flight batching executor over the engine
# -----------------------------------------
TENSORRT_LLM_INPUTS = (
    _t("input_ids", "TYPE_INT32", -1, ragged=True),
    _t("input_lengths", "TYPE_INT32", 1, scalar=True),
    _t("request_output_len", "TYPE_INT32", 1, scalar=True),
    _opt_scalar("end_id", "TYPE_INT32"),
    _opt_scalar("pad_id", "TYPE_INT32"),
    _opt("stop_words_list", "TYPE_INT32", 2, -1, ragged=True),
    _opt("bad_words_list", "TYPE_INT32", 2, -1, ragged=True),
    _opt("embedding_bias", "TYPE_FP32", -1, ragged=True),
    _opt_scalar("beam_width", "TYPE_INT32"),
    _opt_scalar("temperature", "TYPE_FP32"),
    _opt_scalar("runtime_top_k", "TYPE_INT32"),
    _opt_scalar("runtime_top_p", "TYPE_FP32"),
    _opt_scalar("len_penalty", "TYPE_FP32"),
    _opt_scalar("early_stopping", "TYPE_BOOL"),
    _opt_scalar("repetition_penalty", "TYPE_FP32"),
    _opt_scalar("min_tokens", "TYPE_INT32"),
    _opt_scalar("presence_penalty", "TYPE_FP32"),
    _opt_scalar("frequency_penalty", "TYPE_FP32"),
    _opt_scalar("seed", "TYPE_UINT64"),
    _opt_scalar("return_log_probs", "TYPE_BOOL"),
    _opt_scalar("return_context_logits", "TYPE_BOOL"),
    _opt_scalar("return_generation_logits", "TYPE_BOOL"),
    _opt_scalar("exclude_input_in_output", "TYPE_BOOL"),
    _opt_scalar("stop", "TYPE_BOOL"),
    _opt_scalar("streaming", "TYPE_BOOL"),
    _opt_scalar("num_return_sequences", "TYPE_INT32"),
    _opt("encoder_input_features", ENCODER_FEATURES, -1, -1, ragged=True),
    _opt("prompt_embedding_table", PROMPT_TABLE, -1, -1, ragged=True),
    _opt_scalar("prompt_vocab_size", "TYPE_INT32"),
)
TENSORRT_LLM_OUTPUTS = (
    _t("output_ids", "TYPE_INT32", -1, -1),
    _t("sequence_length", "TYPE_INT32", -1),
    _t("cum_log_probs", "TYPE_FP32", -1),
    _t("output_log_probs", "TYPE_FP32", -1, -1),
    _t("context_logits", LOGITS, -1, -1),
    _t("generation_logits", LOGITS, -1, -1, -1),
    _t("batch_index", "TYPE_INT32", 1),
    _t("sequence_index", "TYPE_INT32", 1),
)

# ---- postprocessing: token ids -> text
# ---------------------------------------------------------------------
POSTPROCESSING_INPUTS = (
    _t("TOKENS_BATCH", "TYPE_INT32", -1, -1),
    _t("SEQUENCE_LENGTH", "TYPE_INT32", -1),
)
POSTPROCESSING_OUTPUTS = (_t("OUTPUT", "TYPE_STRING", -1),)

MODEL_TENSORS: dict[str, tuple[tuple[Tensor, ...], tuple[Tensor, ...]]] = {
    "preprocessing": (PREPROCESSING_INPUTS, PREPROCESSING_OUTPUTS),
    "tensorrt_llm": (TENSORRT_LLM_INPUTS, TENSORRT_LLM_OUTPUTS),
    "postprocessing": (POSTPROCESSING_INPUTS, POSTPROCESSING_OUTPUTS),
    "ensemble": (TEXT_INPUTS, TEXT_OUTPUTS),
    "tensorrt_llm_bls": (TEXT_INPUTS, TEXT_OUTPUTS),
}


@dataclass(frozen=True)
class Step:
    """One ensemble step: {model tensor: ensemble tensor} for its inputs and outputs."""

    model: str
    inputs: tuple[tuple[str, str], ...]
    outputs: tuple[tuple[str, str], ...]


def _same(*names: str) -> tuple[tuple[str, str], ...]:
    return tuple((name, name) for name in names)


ENSEMBLE_STEPS = (
    Step(
        "preprocessing",
        inputs=(
            ("QUERY", "text_input"),
            ("REQUEST_OUTPUT_LEN", "max_tokens"),
            ("BAD_WORDS_DICT", "bad_words"),
            ("STOP_WORDS_DICT", "stop_words"),
            ("END_ID", "end_id"),
            ("PAD_ID", "pad_id"),
        ),
        outputs=(
            ("REQUEST_INPUT_LEN", "_REQUEST_INPUT_LEN"),
            ("INPUT_ID", "_INPUT_ID"),
            ("REQUEST_OUTPUT_LEN", "_REQUEST_OUTPUT_LEN"),
            ("STOP_WORDS_IDS", "_STOP_WORDS_IDS"),
            ("BAD_WORDS_IDS", "_BAD_WORDS_IDS"),
            ("OUT_END_ID", "_PREPROCESSOR_END_ID"),
            ("OUT_PAD_ID", "_PREPROCESSOR_PAD_ID"),
        ),
    ),
    Step(
        "tensorrt_llm",
        inputs=(
            ("input_ids", "_INPUT_ID"),
            ("input_lengths", "_REQUEST_INPUT_LEN"),
            ("request_output_len", "_REQUEST_OUTPUT_LEN"),
            ("end_id", "_PREPROCESSOR_END_ID"),
            ("pad_id", "_PREPROCESSOR_PAD_ID"),
            ("stop_words_list", "_STOP_WORDS_IDS"),
            ("bad_words_list", "_BAD_WORDS_IDS"),
            ("runtime_top_k", "top_k"),
            ("runtime_top_p", "top_p"),
            ("len_penalty", "length_penalty"),
            ("streaming", "stream"),
            *_same(
                "exclude_input_in_output",
                "temperature",
                "repetition_penalty",
                "min_tokens",
                "presence_penalty",
                "frequency_penalty",
                "seed",
                "return_log_probs",
                "return_context_logits",
                "return_generation_logits",
                "num_return_sequences",
                "beam_width",
            ),
        ),
        outputs=(
            ("output_ids", "_TOKENS_BATCH"),
            ("sequence_length", "_SEQUENCE_LENGTH"),
            *_same(
                "cum_log_probs",
                "output_log_probs",
                "context_logits",
                "generation_logits",
                "batch_index",
                "sequence_index",
            ),
        ),
    ),
    Step(
        "postprocessing",
        inputs=(("TOKENS_BATCH", "_TOKENS_BATCH"), ("SEQUENCE_LENGTH", "_SEQUENCE_LENGTH")),
        outputs=(("OUTPUT", "text_output"),),
    ),
)

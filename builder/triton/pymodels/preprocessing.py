"""preprocessing: text -> token ids for tensorrt_llm (builder's own model, see builder/triton).

Inputs QUERY, REQUEST_OUTPUT_LEN, optional BAD_WORDS_DICT / STOP_WORDS_DICT / END_ID / PAD_ID;
outputs INPUT_ID (padded with the pad id), REQUEST_INPUT_LEN, BAD_WORDS_IDS / STOP_WORDS_IDS
(TensorRT-LLM's [2, L] layout: flattened ids, then end offsets padded with -1), the request's
output length, and the end/pad ids (the tokenizer's unless the request gives them).
"""

import json
import os
import sys

sys.path[:0] = [
    p
    for p in os.environ.get("BUILDER_TRITON_PYTHONPATH", "").split(os.pathsep)
    if p and p not in sys.path
]

import numpy as np
import triton_python_backend_utils as pb_utils


def load_tokenizer(directory):
    from transformers import AutoTokenizer, PreTrainedConfig

    # An explicit empty config: transformers would otherwise read config.json (nemotron-nas needs
    # remote code); the tokenizer class comes from tokenizer_config.json. Never downloads.
    return AutoTokenizer.from_pretrained(
        directory, config=PreTrainedConfig(), local_files_only=True, trust_remote_code=False
    )


def parameter(model_config, key, default=None):
    value = model_config.get("parameters", {}).get(key, {}).get("string_value", default)
    if value is None or value == "" or value.startswith("${"):
        return default
    return value


def optional_input(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def text(value):
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def words_layout(rows):
    """[batch] lists of token-id lists -> [batch, 2, L] int32 (ids; end offsets, -1 padded)."""
    flat, offsets = [], []
    for words in rows:
        ids, ends = [], []
        for word in words:
            ids.extend(word)
            ends.append(len(ids))
        flat.append(ids)
        offsets.append(ends)
    length = max(1, *(len(ids) for ids in flat), *(len(ends) for ends in offsets))
    out = np.zeros((len(rows), 2, length), dtype=np.int32)
    out[:, 1, :] = -1
    for row, (ids, ends) in enumerate(zip(flat, offsets, strict=True)):
        out[row, 0, : len(ids)] = ids
        out[row, 1, : len(ends)] = ends
    return out


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        directory = parameter(config, "tokenizer_dir")
        if not directory:
            raise pb_utils.TritonModelException("preprocessing: parameter tokenizer_dir is not set")
        self.tokenizer = load_tokenizer(directory)
        self.add_special_tokens = parameter(config, "add_special_tokens", "true").lower() in (
            "true",
            "1",
            "yes",
        )
        eos = self.tokenizer.eos_token_id
        self.end_id = int(eos if eos is not None else 0)
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.end_id)

    def encode_words(self, batch):
        if batch is None:
            return None
        return [
            [self.tokenizer.encode(text(w), add_special_tokens=False) for w in row if text(w)]
            for row in batch
        ]

    def execute(self, requests):
        return [self.preprocess(request) for request in requests]

    def preprocess(self, request):
        query = optional_input(request, "QUERY")
        output_len = optional_input(request, "REQUEST_OUTPUT_LEN")
        batch = query.shape[0]
        ids = [
            self.tokenizer.encode(text(row[0]), add_special_tokens=self.add_special_tokens)
            for row in query
        ]
        end_in, pad_in = optional_input(request, "END_ID"), optional_input(request, "PAD_ID")
        end_ids = (
            end_in.reshape(batch, 1).astype(np.int32)
            if end_in is not None
            else np.full((batch, 1), self.end_id, np.int32)
        )
        pad_ids = (
            pad_in.reshape(batch, 1).astype(np.int32)
            if pad_in is not None
            else np.full((batch, 1), self.pad_id, np.int32)
        )
        width = max(len(row) for row in ids)
        input_ids = np.empty((batch, width), dtype=np.int32)
        for row, tokens in enumerate(ids):
            input_ids[row, :] = pad_ids[row, 0]
            input_ids[row, : len(tokens)] = tokens
        empty = [[] for _ in range(batch)]
        bad = self.encode_words(optional_input(request, "BAD_WORDS_DICT")) or empty
        stop = self.encode_words(optional_input(request, "STOP_WORDS_DICT")) or empty
        outputs = {
            "INPUT_ID": input_ids,
            "REQUEST_INPUT_LEN": np.array([[len(row)] for row in ids], dtype=np.int32),
            "BAD_WORDS_IDS": words_layout(bad),
            "STOP_WORDS_IDS": words_layout(stop),
            "REQUEST_OUTPUT_LEN": output_len.reshape(batch, -1).astype(np.int32),
            "OUT_END_ID": end_ids,
            "OUT_PAD_ID": pad_ids,
        }
        return pb_utils.InferenceResponse([pb_utils.Tensor(k, v) for k, v in outputs.items()])

"""postprocessing: token ids -> text (builder's own model, see builder/triton).

TOKENS_BATCH [batch, beams, tokens] and SEQUENCE_LENGTH [batch, beams] from tensorrt_llm;
OUTPUT [batch, beams] is each beam's first SEQUENCE_LENGTH tokens decoded by the HF tokenizer
at tokenizer_dir. In streaming mode each response carries only the new tokens.
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

    # See preprocessing: an explicit empty config keeps remote code and downloads out.
    return AutoTokenizer.from_pretrained(
        directory, config=PreTrainedConfig(), local_files_only=True, trust_remote_code=False
    )


def parameter(model_config, key, default=None):
    value = model_config.get("parameters", {}).get(key, {}).get("string_value", default)
    if value is None or value == "" or value.startswith("${"):
        return default
    return value


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        directory = parameter(config, "tokenizer_dir")
        if not directory:
            raise pb_utils.TritonModelException(
                "postprocessing: parameter tokenizer_dir is not set"
            )
        self.tokenizer = load_tokenizer(directory)
        self.skip_special_tokens = parameter(config, "skip_special_tokens", "true").lower() in (
            "true",
            "1",
            "yes",
        )

    def execute(self, requests):
        responses = []
        for request in requests:
            tokens = pb_utils.get_input_tensor_by_name(request, "TOKENS_BATCH").as_numpy()
            lengths = pb_utils.get_input_tensor_by_name(request, "SEQUENCE_LENGTH").as_numpy()
            tokens = (
                tokens.reshape(tokens.shape[0], -1, tokens.shape[-1])
                if tokens.ndim != 3
                else tokens
            )
            lengths = lengths.reshape(tokens.shape[0], -1)
            texts = [
                [
                    self.tokenizer.decode(
                        tokens[b, k, : int(lengths[b, k])].tolist(),
                        skip_special_tokens=self.skip_special_tokens,
                    ).encode("utf-8")
                    for k in range(tokens.shape[1])
                ]
                for b in range(tokens.shape[0])
            ]
            out = np.array(texts, dtype=np.object_)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT", out)]))
        return responses

"""tensorrt_llm_bls: the ensemble's text interface as business logic (builder's own model).

Calls preprocessing, tensorrt_llm and postprocessing in turn through Triton's BLS API. In
decoupled mode the tensorrt_llm responses are streamed on as they come (each one detokenized
on its own), otherwise one response per request. The tensor wiring is the ensemble's
(builder/triton/tensors.py, ENSEMBLE_STEPS); this file runs inside the server, so it keeps its
own copy.
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

PREPROCESSING_INPUTS = {
    "QUERY": "text_input",
    "REQUEST_OUTPUT_LEN": "max_tokens",
    "BAD_WORDS_DICT": "bad_words",
    "STOP_WORDS_DICT": "stop_words",
    "END_ID": "end_id",
    "PAD_ID": "pad_id",
}
# tensorrt_llm input <- preprocessing output
FROM_PREPROCESSING = {
    "input_ids": "INPUT_ID",
    "input_lengths": "REQUEST_INPUT_LEN",
    "request_output_len": "REQUEST_OUTPUT_LEN",
    "end_id": "OUT_END_ID",
    "pad_id": "OUT_PAD_ID",
    "stop_words_list": "STOP_WORDS_IDS",
    "bad_words_list": "BAD_WORDS_IDS",
}
# tensorrt_llm input <- request input
FROM_REQUEST = {
    "runtime_top_k": "top_k",
    "runtime_top_p": "top_p",
    "len_penalty": "length_penalty",
    "streaming": "stream",
    **{
        name: name
        for name in (
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
        )
    },
}
PASSED_THROUGH = (
    "cum_log_probs",
    "output_log_probs",
    "context_logits",
    "generation_logits",
    "batch_index",
    "sequence_index",
)


def parameter(model_config, key, default=None):
    value = model_config.get("parameters", {}).get(key, {}).get("string_value", default)
    if value is None or value == "" or value.startswith("${"):
        return default
    return value


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        self.llm = parameter(config, "tensorrt_llm_model_name", "tensorrt_llm")
        self.pre = parameter(config, "preprocessing_model_name", "preprocessing")
        self.post = parameter(config, "postprocessing_model_name", "postprocessing")
        self.outputs = [o["name"] for o in config["output"]]
        # Streaming with accumulate_tokens: each response carries the text of all tokens so far
        # (multi-byte characters split across tokens then decode whole).
        self.accumulate = parameter(config, "accumulate_tokens", "false").lower() in (
            "true",
            "1",
            "yes",
        )

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                if self.decoupled:
                    self.stream(request)
                else:
                    responses.append(self.one(request))
            except Exception as err:  # noqa: BLE001  (the client gets the error, the server keeps serving)
                error = pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(f"tensorrt_llm_bls: {err}")
                )
                if self.decoupled:
                    request.get_response_sender().send(
                        error, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
                    )
                else:
                    responses.append(error)
        return None if self.decoupled else responses

    @staticmethod
    def call(model, tensors, outputs, decoupled=False):
        inference = pb_utils.InferenceRequest(
            model_name=model, inputs=tensors, requested_output_names=outputs
        )
        result = inference.exec(decoupled=decoupled)
        if decoupled:
            return result
        if result.has_error():
            raise pb_utils.TritonModelException(f"{model}: {result.error().message()}")
        return result

    def llm_request(self, request):
        tensors = [
            pb_utils.Tensor(k, t.as_numpy())
            for k, v in PREPROCESSING_INPUTS.items()
            if (t := pb_utils.get_input_tensor_by_name(request, v)) is not None
        ]
        pre = self.call(self.pre, tensors, list(FROM_PREPROCESSING.values()))
        inputs = [
            pb_utils.Tensor(k, pb_utils.get_output_tensor_by_name(pre, v).as_numpy())
            for k, v in FROM_PREPROCESSING.items()
        ]
        inputs += [
            pb_utils.Tensor(k, t.as_numpy())
            for k, v in FROM_REQUEST.items()
            if (t := pb_utils.get_input_tensor_by_name(request, v)) is not None
        ]
        return inputs

    def text_response(self, llm_response, tokens=None, lengths=None):
        if tokens is None:
            tokens = pb_utils.get_output_tensor_by_name(llm_response, "output_ids").as_numpy()
            lengths = pb_utils.get_output_tensor_by_name(llm_response, "sequence_length").as_numpy()
        post = self.call(
            self.post,
            [pb_utils.Tensor("TOKENS_BATCH", tokens), pb_utils.Tensor("SEQUENCE_LENGTH", lengths)],
            ["OUTPUT"],
        )
        tensors = [
            pb_utils.Tensor(
                "text_output", pb_utils.get_output_tensor_by_name(post, "OUTPUT").as_numpy()
            )
        ]
        for name in PASSED_THROUGH:
            tensor = pb_utils.get_output_tensor_by_name(llm_response, name)
            if tensor is not None and name in self.outputs:
                tensors.append(pb_utils.Tensor(name, tensor.as_numpy()))
        return pb_utils.InferenceResponse(tensors)

    def one(self, request):
        result = self.call(
            self.llm, self.llm_request(request), ["output_ids", "sequence_length", *PASSED_THROUGH]
        )
        return self.text_response(result)

    def stream(self, request):
        sender = request.get_response_sender()
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        pending = None  # hold one response back: the last one goes out with the final flag
        so_far = None  # accumulated output_ids [batch, beams, tokens]
        for llm_response in self.call(
            self.llm,
            self.llm_request(request),
            ["output_ids", "sequence_length", *PASSED_THROUGH],
            decoupled=True,
        ):
            if llm_response.has_error():
                raise pb_utils.TritonModelException(f"{self.llm}: {llm_response.error().message()}")
            if not llm_response.output_tensors():
                continue  # a flag-only final response
            if pending is not None:
                sender.send(pending)
            if self.accumulate:
                tokens = pb_utils.get_output_tensor_by_name(llm_response, "output_ids").as_numpy()
                lengths = pb_utils.get_output_tensor_by_name(
                    llm_response, "sequence_length"
                ).as_numpy()
                new = tokens[..., : int(lengths.reshape(-1)[0])]
                so_far = new if so_far is None else np.concatenate([so_far, new], axis=-1)
                full = np.full(lengths.shape, so_far.shape[-1], dtype=lengths.dtype)
                pending = self.text_response(llm_response, so_far, full)
            else:
                pending = self.text_response(llm_response)
        if pending is not None:
            sender.send(pending, flags=final)
        else:
            sender.send(flags=final)

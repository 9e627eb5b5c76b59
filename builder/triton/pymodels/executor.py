"""tensorrt_llm stand-in for machines without TensorRT-LLM: the same tensors as the C++
backend's model, answered by builder's checkpoint executor on the CPU (greedy decoding).

Used by the tests and `builder demo` to serve a generated repository with a real tritonserver.
Parameter `checkpoint_dir`: a TensorRT-LLM checkpoint (any tp/pp; run rank by rank). Honours
input_ids/input_lengths, request_output_len, end_id, exclude_input_in_output, streaming (in
decoupled mode: one response per token) and return_log_probs; sampling parameters are
ignored (greedy). It needs builder and torch on BUILDER_TRITON_PYTHONPATH.
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


def parameter(model_config, key, default=None):
    value = model_config.get("parameters", {}).get(key, {}).get("string_value", default)
    if value is None or value == "" or value.startswith("${"):
        return default
    return value


def scalar(request, name, default):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return default if tensor is None else tensor.as_numpy().reshape(-1)[0].item()


class TritonPythonModel:
    def initialize(self, args):
        import torch

        from builder.runtime import TrtllmCheckpointExecutor

        config = json.loads(args["model_config"])
        torch.set_num_threads(int(parameter(config, "torch_threads", "1")))
        self.executor = TrtllmCheckpointExecutor(parameter(config, "checkpoint_dir"))
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        self.exclude_default = (
            parameter(config, "exclude_input_in_output", "false").lower() == "true"
        )
        self.vocab = self.executor.plan.vocab_size

    def finalize(self):
        self.executor.close()

    def execute(self, requests):
        responses = []
        for request in requests:
            if self.decoupled:
                self.serve_decoupled(request)
            else:
                responses.append(self.serve(request))
        return None if self.decoupled else responses

    def prompt(self, request):
        ids = pb_utils.get_input_tensor_by_name(request, "input_ids").as_numpy()
        lengths = pb_utils.get_input_tensor_by_name(request, "input_lengths").as_numpy().reshape(-1)
        if ids.shape[0] != 1:
            raise pb_utils.TritonModelException("the CPU stand-in serves one sequence per request")
        return ids[0, : int(lengths[0])].tolist()

    def generate(self, request, on_token=None):
        from builder.triton.reference import greedy_generate

        end_id = scalar(request, "end_id", None)
        return greedy_generate(
            self.executor,
            self.prompt(request),
            int(scalar(request, "request_output_len", 16)),
            None if end_id is None else int(end_id),
            on_token,
        )

    def response(self, tokens, log_probs, batch_index=0):
        n = len(tokens)
        outputs = {
            "output_ids": np.array([[tokens]], dtype=np.int32).reshape(1, 1, n),
            "sequence_length": np.array([[n]], dtype=np.int32),
            "cum_log_probs": np.array([[sum(log_probs)]], dtype=np.float32),
            "output_log_probs": np.array([[log_probs]], dtype=np.float32).reshape(1, 1, n),
            # Logits are not computed by the stand-in: empty tensors of the right rank.
            "context_logits": np.zeros((1, 0, self.vocab), dtype=np.float32),
            "generation_logits": np.zeros((1, 1, 0, self.vocab), dtype=np.float32),
            "batch_index": np.array([[batch_index]], dtype=np.int32),
            "sequence_index": np.array([[0]], dtype=np.int32),
        }
        return pb_utils.InferenceResponse([pb_utils.Tensor(k, v) for k, v in outputs.items()])

    def full_output(self, request, generated):
        exclude = bool(scalar(request, "exclude_input_in_output", self.exclude_default))
        prefix = [] if exclude else self.prompt(request)
        return prefix + generated.tokens, [0.0] * len(prefix) + generated.log_probs

    def serve(self, request):
        try:
            return self.response(*self.full_output(request, self.generate(request)))
        except Exception as err:  # noqa: BLE001  (the client gets the error, the server keeps serving)
            return pb_utils.InferenceResponse(
                error=pb_utils.TritonError(f"tensorrt_llm (CPU stand-in): {err}")
            )

    def serve_decoupled(self, request):
        sender = request.get_response_sender()
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            if bool(scalar(request, "streaming", False)):
                pending = []  # hold one token back so the last one goes out with the final flag

                def on_token(token, log_prob):
                    if pending:
                        sender.send(self.response(*pending.pop()))
                    pending.append(([token], [log_prob]))

                self.generate(request, on_token)
                if pending:
                    sender.send(self.response(*pending.pop()), flags=final)
                else:
                    sender.send(flags=final)
            else:
                sender.send(
                    self.response(*self.full_output(request, self.generate(request))), flags=final
                )
        except Exception as err:  # noqa: BLE001  (as in serve)
            sender.send(
                pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(f"tensorrt_llm (CPU stand-in): {err}")
                ),
                flags=final,
            )

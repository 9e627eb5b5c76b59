"""tensorrt_llm (LLM-API layout): TensorRT-LLM's LLM API inside Triton (builder's own model).

`1/model.yaml` holds the `tensorrt_llm.LLM(...)` arguments `builder build --backend pytorch`
chose plus `triton_config` ({max_batch_size, decoupled}), applied here through Triton's
auto-complete so config.pbtxt carries neither. Inputs: text_input, optional streaming and
sampling_param_* tensors (SamplingParams fields); outputs text_output, finish_reason,
cumulative_logprob. Needs a TensorRT-LLM release with the PyTorch backend (and PyYAML).
"""

import os
import sys

sys.path[:0] = [
    p
    for p in os.environ.get("BUILDER_TRITON_PYTHONPATH", "").split(os.pathsep)
    if p and p not in sys.path
]

import numpy as np
import triton_python_backend_utils as pb_utils

HERE = os.path.dirname(os.path.abspath(__file__))
SAMPLING = (
    "temperature",
    "top_k",
    "top_p",
    "frequency_penalty",
    "presence_penalty",
    "max_tokens",
    "stop",
    "seed",
    "exclude_input_from_output",
)


def read_yaml():
    import yaml

    with open(os.path.join(HERE, "model.yaml")) as handle:
        return yaml.safe_load(handle)


def optional(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy().reshape(-1)


class TritonPythonModel:
    @staticmethod
    def auto_complete_config(auto_complete_model_config):
        triton = read_yaml().get("triton_config") or {}
        auto_complete_model_config.set_max_batch_size(int(triton.get("max_batch_size", 0)))
        auto_complete_model_config.set_model_transaction_policy(
            {"decoupled": bool(triton.get("decoupled", False))}
        )
        return auto_complete_model_config

    def initialize(self, args):
        from tensorrt_llm import LLM

        options = read_yaml()
        self.decoupled = bool((options.pop("triton_config", None) or {}).get("decoupled", False))
        self.llm = LLM(**options)

    def finalize(self):
        self.llm.shutdown()

    def sampling(self, request):
        from tensorrt_llm import SamplingParams

        params = {}
        for name in SAMPLING:
            value = optional(request, f"sampling_param_{name}")
            if value is None:
                continue
            if name == "stop":
                params[name] = [v.decode() if isinstance(v, bytes) else str(v) for v in value]
            elif name == "exclude_input_from_output":
                params[name] = bool(value[0])
            else:
                params[name] = value[0].item()
        cumulative = optional(request, "return_cumulative_logprob")
        if cumulative is not None and bool(cumulative[0]):
            params["logprobs"] = 1
        return SamplingParams(**params)

    @staticmethod
    def tensors(text, finish_reason, cum_log_prob):
        return pb_utils.InferenceResponse(
            [
                pb_utils.Tensor("text_output", np.array([text.encode()], dtype=np.object_)),
                pb_utils.Tensor(
                    "finish_reason", np.array([str(finish_reason or "").encode()], dtype=np.object_)
                ),
                pb_utils.Tensor(
                    "cumulative_logprob", np.array([cum_log_prob or 0.0], dtype=np.float32)
                ),
            ]
        )

    def execute(self, requests):
        responses = []
        for request in requests:
            prompt = optional(request, "text_input")[0]
            prompt = prompt.decode() if isinstance(prompt, bytes) else str(prompt)
            streaming = optional(request, "streaming")
            streaming = bool(streaming[0]) if streaming is not None else False
            sampling = self.sampling(request)
            if self.decoupled:
                sender = request.get_response_sender()
                result = self.llm.generate_async(prompt, sampling, streaming=streaming)
                for partial in result:
                    out = partial.outputs[0]
                    sender.send(
                        self.tensors(
                            out.text_diff if streaming else out.text,
                            out.finish_reason,
                            out.cumulative_logprob,
                        )
                    )
                sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            else:
                out = self.llm.generate(prompt, sampling).outputs[0]
                responses.append(self.tensors(out.text, out.finish_reason, out.cumulative_logprob))
        return None if self.decoupled else responses

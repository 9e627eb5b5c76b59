"""Requests to a Triton server's text models over HTTP (generate, generate_stream) and gRPC
(bidirectional stream, which decoupled models need). Loopback only in tests."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import numpy as np


def generate_http(
    url: str, model: str, fields: dict[str, Any], timeout: float = 60
) -> dict[str, Any]:
    """POST /v2/models/MODEL/generate with the request's fields; the response JSON."""
    request = urllib.request.Request(
        f"http://{url}/v2/models/{model}/generate",
        data=json.dumps(fields).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def generate_stream_http(
    url: str, model: str, fields: dict[str, Any], timeout: float = 60
) -> list[dict[str, Any]]:
    """POST /v2/models/MODEL/generate_stream; every server-sent event's JSON, in order."""
    request = urllib.request.Request(
        f"http://{url}/v2/models/{model}/generate_stream",
        data=json.dumps(fields).encode(),
        headers={"Content-Type": "application/json"},
    )
    events = []
    with urllib.request.urlopen(request, timeout=timeout) as response:
        for raw in response:
            line = raw.decode().strip()
            if line.startswith("data:"):
                events.append(json.loads(line[len("data:") :]))
    return events


_TRITON = {
    np.object_: "BYTES",
    np.int32: "INT32",
    np.bool_: "BOOL",
    np.float32: "FP32",
    np.uint64: "UINT64",
}


def _grpc_inputs(fields: dict[str, Any]) -> list[Any]:
    import tritonclient.grpc as grpcclient

    inputs = []
    for name, value in fields.items():
        if isinstance(value, str):
            array = np.array([[value.encode()]], dtype=np.object_)
        elif isinstance(value, bool):
            array = np.array([[value]], dtype=np.bool_)
        elif isinstance(value, int):
            array = np.array([[value]], dtype=np.int32)
        else:
            array = np.array([[value]], dtype=np.float32)
        tensor = grpcclient.InferInput(name, list(array.shape), _TRITON[array.dtype.type])
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def generate_grpc_stream(
    url: str,
    model: str,
    fields: dict[str, Any],
    outputs: tuple[str, ...] = ("text_output",),
    timeout: float = 60,
) -> list[dict[str, Any]]:
    """One request over gRPC's bidirectional stream; each response's `outputs` as numpy arrays."""
    import queue

    import tritonclient.grpc as grpcclient

    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    try:
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        client.async_stream_infer(
            model,
            _grpc_inputs(fields),
            request_id="1",
            outputs=[grpcclient.InferRequestedOutput(o) for o in outputs],
            enable_empty_final_response=True,
        )
        responses = []
        while True:
            result, error = results.get(timeout=timeout)
            if error is not None:
                raise RuntimeError(f"{model} over gRPC: {error}")
            final = result.get_response().parameters.get("triton_final_response")
            if result.get_response().outputs:
                responses.append({o: result.as_numpy(o) for o in outputs})
            if final is not None and final.bool_param:
                return responses
    finally:
        client.stop_stream()
        client.close()

"""A servable copy of a generated engine repository for machines without TensorRT-LLM.

`executor_repository(OUT, checkpoint, dest)` copies OUT's model repository to `dest` and
replaces only the `tensorrt_llm` model: same name, tensors, batch size and decoupled mode,
but `backend: "python"` running pymodels/executor.py (builder's checkpoint executor on the
CPU) over `checkpoint`. preprocessing, postprocessing, ensemble and tensorrt_llm_bls are the
generated files, unchanged.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from builder.errors import UserError
from builder.triton.repository import MODELS_DIR, pymodel_source


def executor_repository(
    out: str | Path,
    checkpoint: str | Path,
    dest: str | Path,
    torch_threads: int = 1,
    instances: int | None = None,
) -> Path:
    """`dest`: OUT's model repository with tensorrt_llm served by the CPU executor.
    `instances` sets every model's instance count (one Python process each) for small hosts."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    source = Path(out) / MODELS_DIR
    if not (source / "tensorrt_llm" / "config.pbtxt").is_file():
        raise UserError(
            f"{source}: no tensorrt_llm model (not an engine repository from `builder triton`)"
        )
    dest = Path(dest)
    shutil.copytree(source, dest)
    path = dest / "tensorrt_llm" / "config.pbtxt"
    config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    exclude = config.parameters["exclude_input_in_output"].string_value or "false"
    config.backend = "python"
    config.ClearField("parameters")
    for key, value in {
        "checkpoint_dir": str(Path(checkpoint).resolve()),
        "exclude_input_in_output": exclude,
        "torch_threads": str(torch_threads),
    }.items():
        config.parameters[key].string_value = value
    path.write_text(
        "# tensorrt_llm replaced by builder's CPU executor (builder/triton/standin.py)\n"
        + text_format.MessageToString(config)
    )
    (dest / "tensorrt_llm" / "1" / "model.py").write_text(pymodel_source("executor.py"))
    if instances is not None:
        for other in dest.glob("*/config.pbtxt"):
            text = other.read_text()
            other.write_text(re.sub(r"(\bcount:\s*)\d+", rf"\g<1>{instances}", text))
    return dest

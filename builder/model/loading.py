"""Loading the reference model from a checkpoint directory, and prompting it.

`load_reference_model` checks the directory with builder's own reader and parser before
transformers touches it, so bad input fails with a message naming the file, tensor or field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from builder import chat
from builder.arch import ModelPlan, hf_tensor_shapes, load_plan
from builder.arch.tensors import optional_hf_shapes
from builder.io.checkpoint import CheckpointError, HFCheckpoint
from builder.model.modeling import DeciLMForCausalLM


def check_checkpoint_tensors(ckpt: HFCheckpoint, plan: ModelPlan) -> None:
    """Every tensor the plan implies is present with its shape, and nothing else is."""
    expected = hf_tensor_shapes(plan)
    expected.update({n: s for n, s in optional_hf_shapes(plan).items() if n in ckpt})
    missing = [name for name in expected if name not in ckpt]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{ckpt.root}: tensor {missing[0]!r} is missing{more}")
    unexpected = [name for name in ckpt.names() if name not in expected]
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(
            f"{ckpt.info(unexpected[0]).file}: tensor {unexpected[0]!r} is not part of the "
            f"plan of {plan.source}{more}"
        )
    for name, shape in expected.items():
        got = ckpt.info(name).shape
        if tuple(got) != tuple(shape):
            raise CheckpointError(
                f"{ckpt.info(name).file}: tensor {name!r} has shape {list(got)}, "
                f"the config implies {list(shape)}"
            )


def load_reference_model(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    allow_pickle: bool = False,
    attn_implementation: str = "sdpa",
    **from_pretrained_kwargs: Any,
) -> DeciLMForCausalLM:
    """The native reference model of the HF nemotron-nas checkpoint at `path`, in eval mode.

    Validates first (index, shard headers, pickle refusal, config, every tensor name and
    shape), then loads through `from_pretrained` without remote code. Extra keyword
    arguments (e.g. `device_map`, `offload_folder`) go to `from_pretrained`.
    """
    path = Path(path)
    ckpt = HFCheckpoint(path, allow_pickle=allow_pickle)
    plan = load_plan(path)
    check_checkpoint_tensors(ckpt, plan)
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attn_implementation}
    if "device_map" not in from_pretrained_kwargs:
        kwargs["device_map"] = str(device)
    if ckpt.files() and ckpt.files()[0].suffix != ".safetensors":
        kwargs["use_safetensors"] = False  # only reached with allow_pickle=True
    model = DeciLMForCausalLM.from_pretrained(
        str(path), trust_remote_code=False, **kwargs, **from_pretrained_kwargs
    )
    return model.eval()


@torch.inference_mode()
def generate_text(
    model: DeciLMForCausalLM,
    tokenizer: Any,
    prompt: str,
    reasoning: bool = False,
    max_new_tokens: int = 64,
    **generate_kwargs: Any,
) -> str:
    """One chat turn: builder.chat's system prompt and sampling defaults, the reply decoded."""
    text = tokenizer.apply_chat_template(
        chat.messages(prompt, reasoning), add_generation_prompt=True, tokenize=False
    )
    # The template already writes any BOS it wants.
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(model.device)
    settings = chat.sampling(reasoning).generate_kwargs() | generate_kwargs
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=pad, **settings)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

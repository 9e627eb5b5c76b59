"""The model card's reasoning control, in one place.

Nemotron-Ultra switches reasoning with its system prompt: "detailed thinking on" or
"detailed thinking off". The card recommends temperature 0.6 / top_p 0.95 with reasoning
on and greedy decoding with it off. Every stage that prompts the model (calibration
prompts, demo, verify) builds its messages and sampling settings here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any

REASONING_ON = "detailed thinking on"
REASONING_OFF = "detailed thinking off"


@dataclass(frozen=True)
class Sampling:
    do_sample: bool
    temperature: float | None
    top_p: float | None

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for transformers' `generate`."""
        if not self.do_sample:
            return {"do_sample": False}
        return {k: v for k, v in asdict(self).items()}


SAMPLING = {
    True: Sampling(do_sample=True, temperature=0.6, top_p=0.95),
    False: Sampling(do_sample=False, temperature=None, top_p=None),
}


def system_prompt(reasoning: bool) -> str:
    return REASONING_ON if reasoning else REASONING_OFF


def sampling(reasoning: bool) -> Sampling:
    return SAMPLING[reasoning]


def messages(
    user: str, reasoning: bool, history: list[dict[str, str]] | None = None
) -> list[dict[str, str]]:
    """Chat messages for one user turn, with the reasoning switch as the system prompt."""
    return [
        {"role": "system", "content": system_prompt(reasoning)},
        *(history or []),
        {"role": "user", "content": user},
    ]


def nemotron_template() -> str:
    """The Llama-3.1-style chat template of the Nemotron-NAS model card."""
    return resources.files("builder.chat").joinpath("templates", "nemotron.jinja").read_text()

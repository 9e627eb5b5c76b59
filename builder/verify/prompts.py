"""Prompt sets of the golden: held-out Wikipedia windows, chat prompts, user JSONL.

wiki     the first `windows` non-overlapping `seq_len`-token windows of the held-out
         Wikipedia text (builder.quantize.calib: articles never used for calibration);
chat     calib/verify-chat.jsonl (user turns written for verification, none of them in the
         calibration prompts), each with reasoning on and off (builder.chat's system prompts),
         rendered with the checkpoint's chat template and the generation prompt;
default  both;
FILE     a .jsonl of {"text": ...}, {"prompt": ...} or {"messages": [...]} lines (a
         conversation ending with a user turn gets the generation prompt), plus optional
         "reasoning": true/false to add the card's system prompt.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from builder import chat
from builder.errors import UserError
from builder.io.jsonl import read_jsonl_objects
from builder.quantize.calib import calib_dir, heldout_text

PROMPT_SETS = ("default", "wiki", "chat")
CHAT_FILE = "verify-chat.jsonl"


@dataclass(frozen=True)
class Prompt:
    """One golden sequence: where it came from, its text and token ids."""

    id: str
    set: str
    text: str
    ids: tuple[int, ...]
    reasoning: bool | None = None

    def describe(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "ids"} | {"tokens": len(self.ids)}


def heldout_windows(tokenizer: Any, count: int, seq_len: int) -> torch.Tensor:
    """The first `count` non-overlapping `seq_len`-token windows of the held-out text."""
    ids = tokenizer(heldout_text(), add_special_tokens=False, verbose=False)["input_ids"]
    if len(ids) < count * seq_len:
        raise UserError(f"held-out text has {len(ids)} tokens; {count} x {seq_len} requested")
    return torch.tensor(ids[: count * seq_len], dtype=torch.long).view(count, seq_len)


def wiki_prompts(tokenizer: Any, count: int, seq_len: int) -> list[Prompt]:
    windows = heldout_windows(tokenizer, count, seq_len)
    return [
        Prompt(f"wiki-{n}", "wiki", tokenizer.decode(w.tolist()), tuple(w.tolist()))
        for n, w in enumerate(windows)
    ]


def chat_text(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    template = getattr(tokenizer, "chat_template", None) or chat.nemotron_template()
    return tokenizer.apply_chat_template(
        messages,
        tokenize=False,
        add_generation_prompt=messages[-1]["role"] == "user",
        chat_template=template,
    )


def _encode(tokenizer: Any, text: str) -> tuple[int, ...]:
    return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])  # templates write BOS


def chat_prompts(tokenizer: Any, count: int, path: Path | None = None) -> list[Prompt]:
    """The first `count` verification chat prompts, each with reasoning on and off."""
    path = path or calib_dir() / CHAT_FILE
    prompts = []
    for number, item in enumerate(_jsonl(path)[:count]):
        for reasoning in (True, False):
            text = chat_text(tokenizer, chat.messages(item["user"], reasoning))
            tag = "on" if reasoning else "off"
            prompts.append(
                Prompt(f"chat-{number}-{tag}", "chat", text, _encode(tokenizer, text), reasoning)
            )
    return prompts


def file_prompts(tokenizer: Any, path: Path) -> list[Prompt]:
    prompts = []
    for number, item in enumerate(_jsonl(path), start=1):
        where = f"{path}:{number}"
        reasoning = item.get("reasoning")
        if "messages" in item:
            messages = item["messages"]
            if (
                not isinstance(messages, list)
                or not messages
                or not all(
                    isinstance(m, dict)
                    and isinstance(m.get("role"), str)
                    and isinstance(m.get("content"), str)
                    for m in messages
                )
            ):
                raise UserError(
                    f"{where}: 'messages' must be a non-empty list of {{role, content}}"
                )
            if reasoning is not None and messages[0]["role"] != "system":
                messages = [
                    {"role": "system", "content": chat.system_prompt(bool(reasoning))},
                    *messages,
                ]
            text = chat_text(tokenizer, messages)
        elif isinstance(item.get("prompt", item.get("text")), str):
            text = item.get("prompt", item.get("text"))
            if reasoning is not None:
                text = chat_text(tokenizer, chat.messages(text, bool(reasoning)))
        else:
            raise UserError(f"{where}: expected a 'text', 'prompt' or 'messages' field")
        ids = _encode(tokenizer, text)
        if len(ids) < 2:
            raise UserError(f"{where}: the prompt has {len(ids)} token(s); at least 2 are needed")
        prompts.append(Prompt(f"user-{number}", "user", text, ids, reasoning))
    if not prompts:
        raise UserError(f"{path}: no prompts")
    return prompts


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [item for _, item in read_jsonl_objects(path)]


def build_prompts(
    tokenizer: Any, prompt_set: str, windows: int, seq_len: int, chat_count: int
) -> list[Prompt]:
    if prompt_set == "wiki":
        return wiki_prompts(tokenizer, windows, seq_len)
    if prompt_set == "chat":
        return chat_prompts(tokenizer, chat_count)
    if prompt_set == "default":
        return wiki_prompts(tokenizer, windows, seq_len) + chat_prompts(tokenizer, chat_count)
    path = Path(prompt_set)
    if path.suffix.lower() != ".jsonl" or not path.is_file():
        raise UserError(
            f"--prompts {prompt_set}: expected {', '.join(PROMPT_SETS)} or a .jsonl file"
        )
    return file_prompts(tokenizer, path)

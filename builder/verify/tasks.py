"""Task accuracy on user JSONL sets, with the model card's templates and sampling.

Each line: {"question": ..., "answer": ..., "type": "math" | "choice", "choices": [...]?}.
  math    the question plus "Put your final answer within \\boxed{}."; the answer is the last
          \\boxed{...} of the reply (balanced braces), compared as numbers when both parse;
  choice  the question, options "A) ...", "Answer with the letter."; the answer is the letter
          of \\boxed{X}, "answer is X" / "Answer: X", else the last standalone A-D.
Both of the card's modes are scored (builder.chat holds the settings): reasoning off,
"detailed thinking off", greedy; reasoning on, "detailed thinking on", sampled at temperature
0.6 / top_p 0.95 (builder.verify.sampling), `task_samples` draws per task with seeds derived
from `task_seed` (builder.verify.golden.task_runs). Verify replays the golden's prompts, lengths
and seeds on the artifact; runtimes that run our code draw with the same picker, so on equal
distributions their sampled replies are the golden's. Replies stop at EOS. The score is the
share of correct answers (over tasks x samples); `recovery` = artifact score / golden score
(llm-compressor's convention): task_accuracy / task_recovery for reasoning off (threshold
`task_recovery_min`), task_accuracy_reasoning_on / task_recovery_reasoning_on for reasoning on.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder.errors import UserError

TASK_TYPES = ("math", "choice")
LETTERS = "ABCDEFGH"
MATH_SUFFIX = "\nPut your final answer within \\boxed{}."
CHOICE_SUFFIX = "\nAnswer with the letter."


@dataclass(frozen=True)
class Task:
    question: str
    answer: str
    type: str
    choices: tuple[str, ...] = ()

    def user_turn(self) -> str:
        if self.type == "math":
            return self.question + MATH_SUFFIX
        options = "\n".join(f"{LETTERS[k]}) {c}" for k, c in enumerate(self.choices))
        return (
            f"{self.question}\n{options}{CHOICE_SUFFIX}"
            if options
            else self.question + CHOICE_SUFFIX
        )

    def correct(self, reply: str) -> bool:
        got = extract_answer(reply, self.type)
        return got is not None and same_answer(got, self.answer, self.type)


def load_tasks(path: str | Path) -> list[Task]:
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: unreadable ({err})") from None
    tasks = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{where}: not valid JSON ({err.msg})") from None
        kind = item.get("type") if isinstance(item, dict) else None
        if kind not in TASK_TYPES:
            raise UserError(f"{where}: 'type' must be one of {', '.join(TASK_TYPES)}")
        if not isinstance(item.get("question"), str) or not isinstance(
            item.get("answer"), str | int | float
        ):
            raise UserError(f"{where}: needs a string 'question' and an 'answer'")
        choices = item.get("choices") or []
        if not isinstance(choices, list) or len(choices) > len(LETTERS):
            raise UserError(f"{where}: 'choices' must be a list of at most {len(LETTERS)} options")
        tasks.append(Task(item["question"], str(item["answer"]), kind, tuple(map(str, choices))))
    if not tasks:
        raise UserError(f"{path}: no tasks")
    return tasks


# ---- answer extraction ---------------------------------------------------------------------------
def last_boxed(text: str) -> str | None:
    """Contents of the last \\boxed{...}, with nested braces balanced."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for pos in range(begin, len(text)):
        if text[pos] == "{":
            depth += 1
        elif text[pos] == "}":
            if depth == 0:
                return text[begin:pos].strip()
            depth -= 1
    return None


def strip_reasoning(text: str) -> str:
    """The reply after a closed <think>...</think> trace (the answer part)."""
    return text.rsplit("</think>", 1)[-1]


_LETTER_PATTERNS = (
    re.compile(r"answer(?: is|:)\s*\(?([A-H])\)?\b", re.IGNORECASE),
    re.compile(r"^\s*\(?([A-H])\)?[.):]?\s*$", re.MULTILINE),
    re.compile(r"\b([A-H])\)"),
    re.compile(r"\b([A-H])\b"),
)


def extract_answer(reply: str, kind: str) -> str | None:
    text = strip_reasoning(reply)
    boxed = last_boxed(text)
    if kind == "math":
        return boxed
    if boxed is not None:
        letter = re.fullmatch(r"\s*\(?([A-H])\)?\s*", boxed.replace("\\text{", "").replace("}", ""))
        if letter:
            return letter[1].upper()
    for pattern in _LETTER_PATTERNS:
        found = pattern.findall(text)
        if found:
            return found[-1].upper() if pattern is _LETTER_PATTERNS[-1] else found[0].upper()
    return None


def _number(text: str) -> float | None:
    cleaned = (
        text.replace("\\$", "")
        .replace("$", "")
        .replace(",", "")
        .replace("\\%", "")
        .replace("%", "")
    )
    cleaned = re.sub(r"\\(?:text|mathrm)\{[^}]*\}", "", cleaned).strip().rstrip(".")
    fraction = re.fullmatch(r"\\d?frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}", cleaned)
    try:
        if fraction:
            return float(fraction[1]) / float(fraction[2])
        return float(cleaned)
    except (ValueError, ZeroDivisionError):
        return None


def same_answer(got: str, expected: str, kind: str) -> bool:
    if kind == "choice":
        return got.strip().upper() == expected.strip().upper()
    a, b = _number(got), _number(expected)
    if a is not None and b is not None:
        return abs(a - b) <= 1e-6 * max(1.0, abs(b))
    return re.sub(r"\s+", "", got) == re.sub(r"\s+", "", expected)


def accuracy(tasks: list[Task], replies: list[str]) -> float:
    return sum(t.correct(r) for t, r in zip(tasks, replies, strict=True)) / len(tasks)


def reply_text(tokenizer: Any, ids: list[int]) -> str:
    """The reply up to (not including) the first EOS, decoded."""
    eos = tokenizer.eos_token_id
    if eos is not None and eos in ids:
        ids = ids[: ids.index(eos)]
    return tokenizer.decode(ids, skip_special_tokens=True)


def task_prompt_ids(tokenizer: Any, task: Task, reasoning: bool) -> list[int]:
    from builder import chat
    from builder.verify.prompts import chat_text

    text = chat_text(tokenizer, chat.messages(task.user_turn(), reasoning))
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])

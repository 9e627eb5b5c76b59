"""The pinned trtllm-build flag set (data/trtllm_build_flags.json) and a checker for argument lists.

The JSON file records the release, the upstream files and commits it was read from, and for
each flag its kind (int, str, switch, list) and allowed values. A generated command that uses
a flag the pinned release does not have, or a value outside its choices, is refused before
anything runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

from builder.errors import UserError

FLAGS_FILE = "trtllm_build_flags.json"


@dataclass(frozen=True)
class FlagSet:
    release: str
    sources: tuple[dict[str, Any], ...]
    constraints: tuple[str, ...]
    flags: dict[str, dict[str, Any]]

    def spec(self, flag: str) -> dict[str, Any] | None:
        if flag in self.flags:
            return self.flags[flag]
        for spec in self.flags.values():
            if flag in spec.get("aliases", ()):
                return spec
        return None

    def provenance(self) -> dict[str, Any]:
        return {"release": self.release, "sources": list(self.sources)}


@lru_cache(maxsize=1)
def load_flag_set() -> FlagSet:
    text = resources.files("builder.deploy").joinpath("data", FLAGS_FILE).read_text()
    data = json.loads(text)
    return FlagSet(
        release=data["release"],
        sources=tuple(data["sources"]),
        constraints=tuple(data.get("constraints", ())),
        flags=data["flags"],
    )


def _value_problem(flag: str, spec: dict[str, Any], value: str) -> str | None:
    if spec["kind"] == "int":
        try:
            int(value)
        except ValueError:
            return f"{flag} {value!r}: expected an integer"
    choices = spec.get("choices")
    if choices and value not in choices:
        return f"{flag} {value!r}: not one of {', '.join(choices)}"
    return None


def arg_problems(args: list[str], flag_set: FlagSet | None = None) -> list[str]:
    """Every way `args` (without the program name) breaks the pinned flag set."""
    flag_set = flag_set or load_flag_set()
    problems, seen, i = [], set(), 0
    while i < len(args):
        flag = args[i]
        spec = flag_set.spec(flag) if flag.startswith("--") else None
        if spec is None:
            what = "unknown flag" if flag.startswith("--") else "stray value"
            problems.append(f"{flag}: {what} for trtllm-build {flag_set.release}")
            i += 1
            continue
        if flag in seen:
            problems.append(f"{flag}: given twice")
        seen.add(flag)
        i += 1
        if spec["kind"] == "switch":
            continue
        values = []
        while i < len(args) and not args[i].startswith("--"):
            values.append(args[i])
            i += 1
            if spec["kind"] != "list":
                break
        if not values:
            problems.append(f"{flag}: needs a value")
        for value in values:
            problem = _value_problem(flag, spec, value)
            if problem:
                problems.append(problem)
        if spec.get("deprecated"):
            problems.append(f"{flag}: deprecated in {flag_set.release} ({spec['deprecated']})")
    if "--multiple_profiles" in seen and "--opt_num_tokens" in seen:
        idx = args.index("--multiple_profiles")
        if idx + 1 < len(args) and args[idx + 1] == "enable":
            problems.append("--multiple_profiles enable conflicts with --opt_num_tokens")
    return problems


def check_args(args: list[str], where: str = "trtllm-build arguments") -> None:
    problems = arg_problems(args)
    if problems:
        release = load_flag_set().release
        raise UserError(
            f"{where} do not match the pinned trtllm-build {release} flag set: "
            + "; ".join(problems)
        )

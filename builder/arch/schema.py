"""Types and ranges of the JSON files builder reads (config.json, the safetensors index).

A schema is data: nested `Object`, `ArrayOf`, `MapOf` and scalar rules. `validate` walks a
parsed JSON value against one and raises the caller's error class for the first mismatch,
naming the file and the field path, e.g.

  config.json: block_configs[3].attention.n_heads_in_group: expected integer >= 1, got "8"

The plan parser (builder.arch.plan) and the checkpoint reader (builder.io.checkpoint) run
these before they interpret anything, so no wrong type reaches arithmetic as a traceback.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from builder.errors import ConfigError, UserError


class Rule:
    """One node of a schema."""

    nullable: bool = False

    def check(self, value: Any, path: str) -> str | None:
        """None if `value` fits, else what was expected (the caller adds the path and value)."""
        raise NotImplementedError

    def children(self, value: Any, path: str):
        """(child value, child path, child rule) to check after `value` itself fits."""
        return ()


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _range(minimum: float | None, exclusive: bool) -> str:
    if minimum is None:
        return ""
    return f" > {minimum:g}" if exclusive else f" >= {minimum:g}"


def _in_range(value: float, minimum: float | None, exclusive: bool) -> bool:
    return minimum is None or (value > minimum if exclusive else value >= minimum)


@dataclass(frozen=True)
class Integer(Rule):
    minimum: int | None = None
    nullable: bool = False

    def check(self, value: Any, path: str) -> str | None:
        ok = _is_integer(value) and _in_range(value, self.minimum, False)
        return None if ok else f"integer{_range(self.minimum, False)}"


@dataclass(frozen=True)
class Number(Rule):
    minimum: float | None = None
    exclusive: bool = False  # minimum itself excluded
    nullable: bool = False

    def check(self, value: Any, path: str) -> str | None:
        ok = _is_number(value) and math.isfinite(value)
        ok = ok and _in_range(value, self.minimum, self.exclusive)
        return None if ok else f"finite number{_range(self.minimum, self.exclusive)}"


@dataclass(frozen=True)
class Boolean(Rule):
    nullable: bool = False

    def check(self, value: Any, path: str) -> str | None:
        return None if isinstance(value, bool) else "true or false"


@dataclass(frozen=True)
class String(Rule):
    non_empty: bool = False
    nullable: bool = False

    def check(self, value: Any, path: str) -> str | None:
        ok = isinstance(value, str) and (value or not self.non_empty)
        return None if ok else ("non-empty string" if self.non_empty else "string")


@dataclass(frozen=True)
class AnyValue(Rule):
    """Accepted as is (its meaning is judged by the parser, e.g. unsupported features)."""

    nullable: bool = True

    def check(self, value: Any, path: str) -> str | None:
        return None


@dataclass(frozen=True)
class ArrayOf(Rule):
    item: Rule
    nullable: bool = False

    def check(self, value: Any, path: str) -> str | None:
        return None if isinstance(value, list) else "an array"

    def children(self, value: Any, path: str):
        return ((v, f"{path}[{i}]", self.item) for i, v in enumerate(value))


@dataclass(frozen=True)
class MapOf(Rule):
    """An object with arbitrary keys, every value of one rule."""

    value: Rule
    nullable: bool = False

    def check(self, value: Any, path: str) -> str | None:
        return None if isinstance(value, Mapping) else "an object"

    def children(self, value: Any, path: str):
        return ((v, f"{path}[{json.dumps(k)}]", self.value) for k, v in value.items())


@dataclass(frozen=True)
class Object(Rule):
    """Named fields; `closed`: any other key is an error (the format may have changed)."""

    fields: Mapping[str, Rule]
    required: frozenset[str] = field(default_factory=frozenset)
    closed: bool = False
    nullable: bool = False

    def check(self, value: Any, path: str) -> str | None:
        return None if isinstance(value, Mapping) else "an object"

    def children(self, value: Any, path: str):
        return ((value.get(name), _join(path, name), rule) for name, rule in self.fields.items())


def describe(value: Any) -> str:
    """A value as the error shows it: JSON, shortened."""
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, list):
        return f"an array of {len(value)}"
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def validate(value: Any, rule: Rule, source: str, error: type[UserError] = ConfigError) -> None:
    """Raise `error` naming `source` and the field path of the first value that does not fit."""
    _walk(value, "", rule, source, error)


def _walk(value: Any, path: str, rule: Rule, source: str, error: type[UserError]) -> None:
    where = f"{source}: {path}" if path else source
    if value is None and rule.nullable:
        return
    expected = rule.check(value, path)
    if expected is not None:
        raise error(f"{where}: expected {expected}, got {describe(value)}")
    if isinstance(rule, Object):
        _walk_object(value, path, rule, source, error)
        return
    for child_value, child_path, child_rule in rule.children(value, path):
        _walk(child_value, child_path, child_rule, source, error)


def _walk_object(value: Mapping[str, Any], path: str, rule: Object, source: str, error) -> None:
    for name in sorted(rule.required):
        if value.get(name) is None:
            raise error(f"{source}: required field {_join(path, name)!r} is missing")
    for name, child in rule.fields.items():
        if value.get(name) is None and name not in rule.required:
            continue  # absent, or null as HF configs write "use the default"
        _walk(value[name], _join(path, name), child, source, error)
    if rule.closed:
        unknown = sorted(set(value) - set(rule.fields))
        if unknown:
            raise error(
                f"{source}: {_join(path, unknown[0])}: unknown field (known: "
                f"{', '.join(rule.fields)}); the format may have changed, and builder does not "
                "guess what it means"
            )

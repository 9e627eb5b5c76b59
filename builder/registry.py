"""Small named registries: exporters, build backends. A new one is a decorated function in
its own module; the CLI's choices are the registry's keys, so adding one touches no CLI code.
(llm-compressor's pipelines/registry.py is the model.)"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from builder.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, what: str):
        self.what = what  # "export format", "build backend": names the kind in errors
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(item: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.what} {name!r} is registered twice")
            self._items[name] = item
            return item

        return add

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise UserError(
                f"unknown {self.what} {name!r}; choose one of {', '.join(self._items)}"
            ) from None

    def names(self) -> tuple[str, ...]:
        return tuple(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

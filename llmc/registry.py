"""One small name → object registry, used for algorithms, adapters, datasets, preprocessors and exporters."""
from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar

from llmc.errors import ConfigError

T = TypeVar("T")


def did_you_mean(value: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(str(value).lower(), [c.lower() for c in choices], n=1, cutoff=0.6)
    if not close:
        return ""
    original = next(c for c in choices if c.lower() == close[0])
    return f" Did you mean '{original}'?"


class Registry(Generic[T]):
    """Case-insensitive registry; several names (LLMC's spellings) may point at one entry."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._display: dict[str, str] = {}

    def register(self, *names: str) -> Callable[[T], T]:
        def decorate(obj: T) -> T:
            for name in names:
                key = name.lower()
                if key in self._entries and self._entries[key] is not obj:
                    raise ValueError(f"{self.kind} '{name}' is registered twice")
                self._entries[key] = obj
                self._display.setdefault(key, name)
            return obj

        return decorate

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._entries

    def names(self) -> list[str]:
        return sorted(self._display.values(), key=str.lower)

    def get(self, name: str, key: str = "") -> T:
        """Look up `name`; `key` is the config key path used in the error message."""
        if name in self:
            return self._entries[name.lower()]
        raise ConfigError(
            key,
            f"unknown {self.kind} '{name}'. Registered: {', '.join(self.names())}.{did_you_mean(name, self.names())}",
        )

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


ALGORITHMS: Registry = Registry("algorithm")
ADAPTERS: Registry = Registry("model adapter")
DATASETS: Registry = Registry("dataset")
PREPROCESSORS: Registry = Registry("preprocessor")
EXPORTERS: Registry = Registry("exporter")

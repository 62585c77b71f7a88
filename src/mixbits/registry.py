"""One tiny registry type shared by models, datasets and searchers (fvcore/timm style)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .errors import MixbitsError, did_you_mean


class Registry:
    """Maps a name to a factory. ``@REG.register("name")`` adds one; ``REG.get(name)`` looks it up."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, Callable[..., Any]] = {}

    def register(self, name: str | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def add(fn: Callable[..., Any]) -> Callable[..., Any]:
            key = name or fn.__name__
            if key in self._items:
                raise KeyError(f"{self.kind} {key!r} is registered twice")
            self._items[key] = fn
            return fn

        return add

    def get(self, name: str) -> Callable[..., Any]:
        if name not in self._items:
            hint = did_you_mean(name, self._items)
            raise MixbitsError(f"unknown {self.kind} {name!r}; expected one of: {', '.join(self.names())}.{hint}")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def describe(self) -> dict[str, str]:
        """name -> first line of the factory's docstring, for `mixbits list`."""
        return {n: (self._items[n].__doc__ or "").strip().split("\n")[0] for n in self.names()}

"""Name -> function registries whose unknown-name error lists the valid names."""

from __future__ import annotations

from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)


class Registry(dict):
    """A dict of named functions; ``registry[name]`` on a missing name says which names exist."""

    def __init__(self, kind: str, wrap: Callable[[F], F] | None = None):
        super().__init__()
        self.kind = kind
        self.wrap = wrap  # applied to every function at registration (e.g. a dtype guard)

    def register(self, *names: str) -> Callable[[F], F]:
        def add(fn: F) -> F:
            fn = self.wrap(fn) if self.wrap else fn
            for name in names:
                if name in self:
                    raise ValueError(f"{self.kind} {name!r} is registered twice")
                self[name] = fn
            return fn

        return add

    def __missing__(self, name: str):
        raise KeyError(f"unknown {self.kind} {name!r}; valid names: {', '.join(sorted(self))}")

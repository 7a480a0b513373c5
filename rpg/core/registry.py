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


def member(family: str, divergence: str | None = None) -> Callable[[F], F]:
    """Tag a loss with its family ("fd", "rf", "grpo", "grpo_is" or "ppo", docs/algorithms.md sections 3-4)
    and its RPG divergence ("fkl", "rkl", "ufkl", "urkl"): what a reader, and the tests' independent
    reference of each formula, need to know about it."""
    def tag(fn: F) -> F:
        fn.family, fn.divergence = family, divergence
        return fn

    return tag

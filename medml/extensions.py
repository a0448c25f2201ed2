"""One registry per extension point (losses, miners, backbones, intensity steps, importers).

A registry maps a name to what builds the thing. Entries name their implementation by dotted
path (``"pytorch_metric_learning.losses.ArcFaceLoss"``) and import it only when built, so
listing and checking names costs nothing: the settings validate names against the
registries without importing torch. Adding an extension is one file (the implementation) and
one registration (a line in the extension point's registry module).
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class UnknownName(ValueError):
    """A name no registry entry has; the message lists the known ones and the nearest."""


class Registry(Generic[T]):
    """Names to entries of one kind, in registration order."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T) -> T:
        """Add ``entry`` under ``name`` (a name is registered once)."""
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered already")
        self._entries[name] = entry
        return entry

    def __getitem__(self, name: str) -> T:
        self.check(name)
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def check(self, name: str) -> str:
        """``name`` if registered; else :class:`UnknownName` listing the choices."""
        if name in self._entries:
            return name
        near = difflib.get_close_matches(name, self._entries, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise UnknownName(
            f"unknown {self.kind} {name!r}{hint}; registered: {', '.join(self._entries)}"
        )


def import_object(dotted: str) -> Any:
    """``"package.module.Name"`` -> the object (imported now)."""
    module, _, attr = dotted.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def registry(module: str, attr: str) -> Registry[Any]:
    """A registry by module and attribute name, imported on first use.

    The settings (the bottom layer) check names with this, so they never import the layers
    that define the extension points (import-linter sees no upward import).
    """
    return getattr(importlib.import_module(module), attr)

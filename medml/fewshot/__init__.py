"""Few-shot classification: class prototypes (centroids) and nearest-centroid prediction."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from medml.fewshot.prototypes import Prototypes, build_prototypes, select_support

__all__ = ["Prototypes", "build_prototypes", "select_support"]


def __getattr__(name: str) -> Any:
    # Imported on first use: the settings import this package to check a rule's name
    # (medml.fewshot.registry), which must not cost numpy and the prototypes.
    if name in __all__:
        from medml.fewshot import prototypes

        return getattr(prototypes, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

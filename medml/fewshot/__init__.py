"""Few-shot classification: class prototypes (centroids) and nearest-centroid prediction."""

from medml.fewshot.prototypes import Prototypes, build_prototypes, select_support

__all__ = ["Prototypes", "build_prototypes", "select_support"]

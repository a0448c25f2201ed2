"""Evaluation: Reality Check retrieval metrics, nearest-centroid classification, episodes."""

from medml.evaluate.metrics import centroid_metrics, fewshot_episodes, retrieval_metrics

__all__ = ["centroid_metrics", "fewshot_episodes", "retrieval_metrics"]

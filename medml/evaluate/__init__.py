"""Evaluation: retrieval metrics (Reality Check), nearest-centroid classification, few-shot episodes."""

from medml.evaluate.metrics import centroid_metrics, fewshot_episodes, retrieval_metrics

__all__ = ["centroid_metrics", "fewshot_episodes", "retrieval_metrics"]

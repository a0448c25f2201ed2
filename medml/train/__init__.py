"""Training: metric learning of the encoder on the catalog's train split, tracked in MLflow."""

from medml.train.loop import TrainResult, ensure_splits, train

__all__ = ["TrainResult", "ensure_splits", "train"]

"""Encoders: MONAI backbone + projection head + L2 normalisation."""

from medml.models.encoder import Encoder, build_encoder

__all__ = ["Encoder", "build_encoder"]

"""Learning-rate schedule: linear warmup, then cosine decay to zero, stepped per batch."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine(opt: Optimizer, warmup_steps: int, total_steps: int) -> LambdaLR:
    """Multiplier ramps 1/w .. 1 over ``warmup_steps``, then follows a half cosine to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return LambdaLR(opt, factor)

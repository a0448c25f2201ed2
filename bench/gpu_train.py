"""GPU settings of the MedMNIST 3D recipe, measured: training volumes/s per setting, one run.

What a GPU run changes is the batch (larger), mixed precision (AMP, float16 autocast with a
grad scaler, as ``train.amp`` does) and the memory layout (``channels_last_3d``, which lets
cuDNN pick NDHWC convolution kernels). This script times the recipe's encoder step under
each combination on random 28^3 (or ``--size``) batches and prints volumes/s and the ratio to
the fp32, contiguous baseline, so the settings to use are read off one run. On a CPU it runs
the fp32 rows only (AMP is a CUDA feature here) and says so.

    .venv/bin/python bench/gpu_train.py                      # 28^3, batch 32/128/256
    .venv/bin/python bench/gpu_train.py --size 64 --batches 32,64
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from medml.config import load_settings
from medml.losses import build_loss
from medml.models.encoder import build_encoder
from medml.train.trainer import MetricModel

ROOT = Path(__file__).resolve().parents[1]


def rate(model, batch: int, size: int, amp: bool, channels_last: bool, steps: int) -> float:
    """Volumes/s of optimiser steps on random inputs (after warm-up)."""
    dev = next(model.parameters()).device
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler(dev.type, enabled=amp)
    x = torch.rand(batch, 1, size, size, size, device=dev).to(memory_format=fmt)
    y = torch.arange(batch, device=dev) % 2

    def step() -> None:
        with torch.autocast(device_type=dev.type, dtype=torch.float16, enabled=amp):
            loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    for _ in range(3):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "medmnist3d.yaml"))
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--batches", default="32,128,256")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    settings = load_settings(args.config)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = dev.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    print(f"device {dev}, input {args.size}^3, backbone {settings.model.backbone}")
    if not cuda:
        print("no CUDA device: AMP rows skipped (AMP is CUDA-only in medml)")
    print(f"{'batch':>6} {'AMP':>5} {'channels-last':>14} {'volumes/s':>10} {'ratio':>6}")
    for batch in (int(b) for b in args.batches.split(",")):
        base = None
        for amp in (False, True) if cuda else (False,):
            for channels_last in (False, True):
                torch.manual_seed(0)
                model = MetricModel(
                    build_encoder(settings.model),
                    build_loss(settings.loss, 2, settings.model.embedding_dim),
                ).to(dev)
                vps = rate(model, batch, args.size, amp, channels_last, args.steps)
                base = base or vps
                print(f"{batch:6d} {amp!s:>5} {channels_last!s:>14} {vps:10.1f} {vps / base:6.2f}")


if __name__ == "__main__":
    main()

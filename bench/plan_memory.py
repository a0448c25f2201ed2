"""Benchmark: training memory per input voxel vs the planner's ``plan.bytes_per_voxel`` (not a
test).

Runs two training steps (forward, backward, AdamW) of the configured encoder on random
volumes, each batch size in a fresh process so that its peak resident memory is its own; the
slope of peak memory over voxels in the batch is the cost of one voxel. Prints the measured
bytes per voxel, the configured value and their ratio (goal <= 1: the plans never promise a
batch that does not fit), plus the fixed cost (model, optimizer, interpreter).

    .venv/bin/python bench/plan_memory.py [--config configs/demo.yaml] [--size 64]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np

CHILD = """
import json, resource, sys, torch
torch.set_num_threads(1)
from medml.config import load_settings
from medml.models.encoder import build_encoder
settings = load_settings(sys.argv[1] or None)
batch, size = int(sys.argv[2]), int(sys.argv[3])
model = build_encoder(settings.model)
opt = torch.optim.AdamW(model.parameters())
x = torch.randn(batch, 1, size, size, size)
for _ in range(2):
    model(x).sum().backward()
    opt.step()
    opt.zero_grad()
print(json.dumps({"peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def peak_bytes(config: str, batch: int, size: int) -> float:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, config, str(batch), str(size)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_kb"] * 1024.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="")
    parser.add_argument("--size", type=int, default=64, help="edge of the cubic input")
    parser.add_argument("--batches", default="2,4,8")
    args = parser.parse_args()

    from medml.config import load_settings

    settings = load_settings(args.config or None)
    batches = [int(b) for b in args.batches.split(",")]
    voxels = np.array([b * args.size**3 for b in batches], dtype=float)
    peaks = np.array([peak_bytes(args.config, b, args.size) for b in batches])
    slope, fixed = np.polyfit(voxels, peaks, 1)
    configured = settings.plan.bytes_per_voxel
    for b, v, p in zip(batches, voxels, peaks):
        print(f"batch {b:3d} x {args.size}^3 = {v / 1e6:6.2f} M voxels: peak {p / 2**20:8.1f} MiB")
    print(
        f"{settings.model.backbone} (widen {settings.model.widen_factor}): measured "
        f"{slope:.0f} B/voxel + {fixed / 2**20:.0f} MiB fixed; plan.bytes_per_voxel "
        f"{configured:g}; measured/configured {slope / configured:.2f}"
    )


if __name__ == "__main__":
    main()

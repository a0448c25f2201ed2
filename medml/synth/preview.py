"""A PNG grid of middle slices per class, so a person sees what each class looks like.

``python -m medml.synth.preview docs/`` writes ``synth-covid-ct.png`` and
``synth-cirrhosis-mri.png`` (base classes, then the novel ones).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from medml.config import SynthConfig
from medml.synth import GENERATORS, class_names


def middle_slices(kind: str, per_class: int = 4, seed: int = 0, **overrides) -> dict[str, list]:
    """``class -> [(2-D middle slice, caption), ...]`` rendered with the default config."""
    cfg = SynthConfig(kind=kind, novel=True, seed=seed, **overrides)
    gen = GENERATORS[kind]
    out: dict[str, list] = {}
    for label, name in enumerate(class_names(cfg)):
        out[name] = []
        for i in range(per_class):
            rng = np.random.default_rng([seed, label, i])
            params = gen.draw(label, cfg, rng)
            vol, _ = gen.render(params, cfg, rng)
            caption = getattr(params, "plane", "") + " " + getattr(params, "weighting", "")
            out[name].append((vol[vol.shape[0] // 2], caption.strip()))
    return out


def class_grid(kind: str, path: Path, per_class: int = 4) -> Path:
    """Write the grid (rows: classes; columns: examples) as a PNG with matplotlib's Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    slices = middle_slices(kind, per_class)
    fig, axes = plt.subplots(
        len(slices), per_class, figsize=(1.9 * per_class, 1.9 * len(slices)), squeeze=False
    )
    for r, (name, images) in enumerate(slices.items()):
        for c, (img, caption) in enumerate(images):
            ax = axes[r, c]
            if kind == "covid-ct":
                ax.imshow(img, cmap="gray", vmin=-1150, vmax=350)  # the lung window
            else:
                ax.imshow(img, cmap="gray", vmin=0, vmax=np.percentile(img, 99.5))
            ax.set_xticks([])
            ax.set_yticks([])
            if caption:
                ax.set_title(caption, fontsize=7)
            if c == 0:
                ax.set_ylabel(name, fontsize=9)
    fig.suptitle(f"medml synth {kind}: middle slice per class (rows)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


if __name__ == "__main__":
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "docs")
    for kind in GENERATORS:
        print(class_grid(kind, folder / f"synth-{kind}.png"))

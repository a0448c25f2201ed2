"""Fit the decision rule on validation embeddings: softmax temperature and 'unknown' threshold.

- Temperature: minimise the negative log-likelihood of the validation labels under
  ``softmax(similarity / T)`` against prototypes built from other scans (usually the training
  split or the support set), as in temperature scaling (Guo et al. 2017).
- Unknown threshold: no validation scan of a truly unseen class exists, so each validation scan
  plays an unknown once by hiding its own class's prototype (leave-one-class-out); its best
  similarity to the remaining prototypes is an impostor score. The threshold is the lowest one
  whose impostor acceptance rate stays within the configured false-accept rate. The cost is
  the false-reject rate on known scans, reported with the whole curve.

Hand-written: no installed library fits prototype open-set thresholds this way.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import minimize_scalar

from medml.fewshot.prototypes import Prototypes


@dataclass
class Calibration:
    """Fitted values and the evidence behind them."""

    temperature: float
    nll_before: float
    nll_after: float
    unknown_threshold: float | None
    false_accept_rate: float | None  # at the chosen threshold, on impostor scores
    false_reject_rate: float | None  # at the chosen threshold, on known validation scans
    curve: pd.DataFrame  # threshold, false_accept_rate, false_reject_rate
    n_val: int

    def metrics(self) -> dict[str, float]:
        """Flat numbers for MLflow."""
        out = {
            "calib_temperature": self.temperature,
            "calib_nll_before": self.nll_before,
            "calib_nll_after": self.nll_after,
            "calib_n_val": float(self.n_val),
        }
        if self.unknown_threshold is not None:
            out["calib_unknown_threshold"] = self.unknown_threshold
            out["calib_false_accept_rate"] = float(self.false_accept_rate or 0.0)
            out["calib_false_reject_rate"] = float(self.false_reject_rate or 0.0)
        return out


def nll(sims: np.ndarray, target: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of ``target`` under ``softmax(sims / temperature)``."""
    logits = sims / temperature
    logits = logits - logits.max(axis=1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return float(-log_p[np.arange(len(target)), target].mean())


def fit_temperature(sims: np.ndarray, target: np.ndarray, bounds=(1e-3, 10.0)) -> float:
    """Temperature minimising validation NLL (bounded 1-D search over log T)."""
    res = minimize_scalar(
        lambda log_t: nll(sims, target, float(np.exp(log_t))),
        bounds=(np.log(bounds[0]), np.log(bounds[1])),
        method="bounded",
    )
    return float(np.exp(res.x))


def impostor_scores(sims: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Best similarity of each scan to the prototypes of the *other* classes."""
    hidden = sims.copy()
    hidden[np.arange(len(target)), target] = -np.inf
    return hidden.max(axis=1)


def threshold_for_far(impostors: np.ndarray, far: float) -> float:
    """Lowest threshold accepting at most ``far`` of the impostor scores (accept: sim >= t)."""
    ordered = np.sort(impostors)[::-1]
    allowed = int(np.floor(far * len(ordered) + 1e-9))
    if allowed >= len(ordered):
        return -1.0
    return float(np.nextafter(ordered[allowed], np.inf))


def open_set_curve(known_best: np.ndarray, impostors: np.ndarray) -> pd.DataFrame:
    """False-accept (impostors) and false-reject (known scans) rates at every score threshold."""
    grid = np.unique(np.concatenate([known_best, impostors, [-1.0, 1.0 + 1e-6]]))
    return pd.DataFrame(
        {
            "threshold": grid,
            "false_accept_rate": [(impostors >= t).mean() for t in grid],
            "false_reject_rate": [(known_best < t).mean() for t in grid],
        }
    )


def calibrate(
    protos: Prototypes,
    val_emb: np.ndarray,
    val_labels: list[str],
    target_far: float | None,
) -> tuple[Prototypes, Calibration]:
    """Prototypes with temperature (and, given ``target_far``, threshold) fitted on validation.

    Validation scans of classes the prototypes do not know are ignored.
    """
    index = {c: i for i, c in enumerate(protos.classes)}
    keep = np.array([lab in index for lab in val_labels], dtype=bool)
    if keep.sum() < 2:
        raise ValueError("calibration needs at least 2 validation scans of known classes")
    sims = protos.similarities(np.asarray(val_emb)[keep])
    target = np.array([index[lab] for lab, k in zip(val_labels, keep) if k])
    temperature = fit_temperature(sims, target)
    known_best = sims.max(axis=1)
    threshold = far = frr = None
    curve = pd.DataFrame(columns=["threshold", "false_accept_rate", "false_reject_rate"])
    if target_far is not None and len(protos.classes) > 1:
        imp = impostor_scores(sims, target)
        curve = open_set_curve(known_best, imp)
        threshold = threshold_for_far(imp, target_far)
        far = float((imp >= threshold).mean())
        frr = float((known_best < threshold).mean())
    cal = Calibration(
        temperature,
        nll(sims, target, protos.temperature),
        nll(sims, target, temperature),
        threshold,
        far,
        frr,
        curve,
        int(keep.sum()),
    )
    fitted = replace(
        protos,
        temperature=temperature,
        unknown_threshold=threshold if target_far is not None else protos.unknown_threshold,
    )
    return fitted, cal


def save_curve_figure(cal: Calibration, path: Path) -> None:
    """False-accept and false-reject rates against the threshold, the chosen one marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(cal.curve.threshold, cal.curve.false_accept_rate, label="false accept (impostors)")
    ax.plot(cal.curve.threshold, cal.curve.false_reject_rate, label="false reject (known)")
    if cal.unknown_threshold is not None:
        ax.axvline(cal.unknown_threshold, color="k", ls="--", lw=1, label="chosen threshold")
    ax.set_xlabel("cosine similarity threshold")
    ax.set_ylabel("rate")
    ax.set_title("Open-set threshold on validation")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

"""How much accuracy the binary decision threshold costs, on stored CV embeddings (no training).

Reads the fold dumps of ``bench/recipe_search.py --dump DIR`` (support = the fold's training
scans, queries = its held-out scans, 8-flip TTA embeddings of the raw model) and scores the
``centroid-prior`` rule, p1 = sigmoid(d / T + log(pi1 / pi0)) with d = cos(x, c1) - cos(x, c0),
when 1/T is fitted by maximum likelihood on calibration sets of different sizes:

- ``val98``: 98 held-out scans drawn at random (the size of AdrenalMNIST3D's val split), the
  rule scored on the fold's other held-out scans; 200 draws, mean and sd;
- ``n214`` / ``n300``: the same with 214 (half a fold) and 300 calibration scans;
- ``support``: fitted on the training scans themselves (their d is over-separated: the
  encoder was trained on them);
- ``insample``: fitted on every held-out scan and scored on them (what an unlimited
  calibration set could reach);
- ``platt98``: a 2-parameter logistic fit of d (slope and intercept) on 98 scans;
- ``oracle``: the best single threshold on d chosen on the scored scans themselves (an upper
  bound of any threshold rule, not a rule);
- ``nc``: nearest centroid, no prior (threshold d = 0).

    PYTHONPATH=$PWD python bench/threshold_study.py "/tmp/emb/cv_softmax_dump_s0_f*.npz"
"""

from __future__ import annotations

import argparse
import glob
import math
from pathlib import Path

import numpy as np
from scipy.optimize import minimize_scalar
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

COLUMNS = ["auc", "nc", "support", "val98", "val98_sd", "platt98", "n214", "n300", "insample"]
COLUMNS += ["oracle", "invT_val98", "invT_insample"]


def centroids(emb: np.ndarray, y: np.ndarray) -> np.ndarray:
    c = np.stack([emb[y == k].mean(0) for k in (0, 1)])
    return c / np.linalg.norm(c, axis=1, keepdims=True)


def fit_inv_temperature(d: np.ndarray, y: np.ndarray, bias: float) -> float:
    """Maximum-likelihood 1/T of sigmoid(d / T + bias), bounded 1-D search over log(1/T)."""

    def nll(log_inv_t: float) -> float:
        z = d * math.exp(log_inv_t) + bias
        return float(np.mean(np.logaddexp(0, z) - y * z))

    res = minimize_scalar(nll, bounds=(math.log(0.1), math.log(1000)), method="bounded")
    return math.exp(res.x)


def study(path: Path, draws: int, rng: np.random.Generator) -> dict[str, float]:
    """Every column of :data:`COLUMNS` for one fold dump."""
    z = np.load(path)
    c = centroids(z["s_emb"], z["s_y"])
    d, y = z["q_emb"] @ c[1] - z["q_emb"] @ c[0], z["q_y"]
    ds, sy = z["s_emb"] @ c[1] - z["s_emb"] @ c[0], z["s_y"]
    bias = math.log(sy.mean() / (1 - sy.mean()))

    def acc(inv_t: float, idx=slice(None)) -> float:
        return float(np.mean((d[idx] * inv_t + bias > 0) == y[idx]))

    row = {"auc": roc_auc_score(y, d), "nc": float(np.mean((d > 0) == y))}
    row["support"] = acc(fit_inv_temperature(ds, sy, bias))
    for n in (98, 214, 300):
        accs, platt, inv_ts = [], [], []
        for _ in range(draws):
            perm = rng.permutation(len(y))
            cal, rest = perm[:n], perm[n:]
            inv_t = fit_inv_temperature(d[cal], y[cal], bias)
            inv_ts.append(inv_t)
            accs.append(acc(inv_t, rest))
            if n == 98:
                lr = LogisticRegression(C=1e4).fit(d[cal, None], y[cal])
                platt.append(float(np.mean(lr.predict(d[rest, None]) == y[rest])))
        key = "val98" if n == 98 else f"n{n}"
        row[key] = float(np.mean(accs))
        if n == 98:
            row["val98_sd"], row["platt98"] = float(np.std(accs)), float(np.mean(platt))
            row["invT_val98"] = float(np.median(inv_ts))
    inv_t = fit_inv_temperature(d, y, bias)
    row["insample"], row["invT_insample"] = acc(inv_t), inv_t
    row["oracle"] = max(float(np.mean((d > t) == y)) for t in np.concatenate([[-9], d]))
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("pattern", help="glob of recipe_search.py --dump files")
    p.add_argument("--draws", type=int, default=200)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    rows = {Path(f).stem: study(Path(f), args.draws, rng) for f in sorted(glob.glob(args.pattern))}
    if not rows:
        raise SystemExit(f"no file matches {args.pattern}")
    print("| fold | " + " | ".join(COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{row[k]:.3f}" for k in COLUMNS) + " |")
    mean = {k: np.mean([r[k] for r in rows.values()]) for k in COLUMNS}
    print("| **mean** | " + " | ".join(f"{mean[k]:.3f}" for k in COLUMNS) + " |")


if __name__ == "__main__":
    main()

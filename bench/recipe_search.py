"""Recipe search for MedMNIST 3D shape masks (AdrenalMNIST3D), one change at a time.

Loads the official .npz straight into memory (no workspace), trains the library's encoder
(``medml.models.encoder.build_encoder``) with the library's losses (``medml.losses.build_loss``)
and scores every held-out scan under several decision rules, with and without weight EMA and
flip test-time augmentation, so that one training run answers several questions at once.

Protocols (``--protocol``):
  cv     stratified K-fold CV on train+val (test untouched); one row per fold/variant/rule.
  val    train on the official train split, score on the official val split.
  test   train on train (+val with ``--train-on-val``), score on test: only for the final recipe.

Every row is appended to ``--out`` (CSV) with the run's wall time; ``bench/recipe_summary.py``
aggregates them. One torch thread per run: the machine is shared.

    PYTHONPATH=$PWD python bench/recipe_search.py --name base --protocol cv --folds 3
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning.samplers import MPerClassSampler
from sklearn.cluster import KMeans
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from medml.config import LossConfig, ModelConfig
from medml.data.augment import rotation
from medml.losses import build_loss
from medml.metrics import retrieval_metrics
from medml.models.encoder import build_encoder

NPZ = Path(__file__).resolve().parents[1] / "../shared/data/medmnist/adrenalmnist3d.npz"


# ----------------------------------------------------------------------------- data
def load_npz(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Official splits as float32 ``(N, 1, D, H, W)`` in 0..1 and int labels."""
    d = np.load(path)
    out = {}
    for s in ("train", "val", "test"):
        x = d[f"{s}_images"].astype(np.float32) / 255.0
        out[s] = (x[:, None], d[f"{s}_labels"][:, 0].astype(np.int64))
    return out


# ----------------------------------------------------------------------------- augmentation
def augment(x: torch.Tensor, spec: dict, g: torch.Generator) -> torch.Tensor:
    """Batched shape-mask augmentation: per-axis flips, 90-degree turns, small affine.

    spec keys: flip (axes 0..2 flipped each with p_flip), p_flip, rot90 (planes as axis
    pairs, a random k*90 turn in one of them with p_rot90), affine_p, rot_deg, scale, shift
    (voxels). No intensity transforms: the inputs are binary masks.
    """
    b = x.shape[0]
    for ax in spec.get("flip", []):
        on = torch.rand(b, generator=g) < spec.get("p_flip", 0.5)
        x = torch.where(on[:, None, None, None, None], x.flip(2 + ax), x)
    planes = spec.get("rot90", [])
    if planes:
        out = []
        for i in range(b):
            xi = x[i]
            if torch.rand(1, generator=g).item() < spec.get("p_rot90", 0.5):
                a, c = planes[int(torch.randint(len(planes), (1,), generator=g))]
                k = int(torch.randint(1, 4, (1,), generator=g))
                xi = torch.rot90(xi, k, (1 + a, 1 + c))
            out.append(xi)
        x = torch.stack(out)
    p = spec.get("affine_p", 0.0)
    if p > 0:
        on = (torch.rand(b, generator=g) < p).float()[:, None]
        angles = (2 * torch.rand(b, 3, generator=g) - 1) * math.radians(spec["rot_deg"]) * on
        zoom = 1.0 + (2 * torch.rand(b, 3, generator=g) - 1) * spec["scale"] * on
        theta = torch.zeros(b, 3, 4)
        theta[:, :, :3] = rotation(angles) / zoom[:, None, :]
        shift_vox = spec.get("shift", 0.0)
        theta[:, :, 3] = (2 * torch.rand(b, 3, generator=g) - 1) * on * 2 * shift_vox / 28.0
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return x


AUGS = {
    "none": {},
    "shipped": {"flip": [0], "affine_p": 0.5, "rot_deg": 10, "scale": 0.1},
    "flip0": {"flip": [0]},
    "flip3": {"flip": [0, 1, 2]},
    "flip3_aff": {"flip": [0, 1, 2], "affine_p": 0.5, "rot_deg": 10, "scale": 0.1},
    "flip3_rot90": {"flip": [0, 1, 2], "rot90": [(0, 1), (0, 2), (1, 2)]},
    "flip3_rot90_aff": {
        "flip": [0, 1, 2],
        "rot90": [(0, 1), (0, 2), (1, 2)],
        "affine_p": 0.5,
        "rot_deg": 10,
        "scale": 0.1,
    },
    "flip3_aff_shift": {
        "flip": [0, 1, 2],
        "affine_p": 0.5,
        "rot_deg": 10,
        "scale": 0.1,
        "shift": 2,
    },
    # rotation only: zoom changes a gland's size, which may be the label's signal
    "flip3_rot": {"flip": [0, 1, 2], "affine_p": 0.5, "rot_deg": 10, "scale": 0.0},
    "flip3_aff20": {"flip": [0, 1, 2], "affine_p": 0.8, "rot_deg": 20, "scale": 0.15},
}
TTA_FLIPS = {
    "none": [()],
    "flip0": [(), (0,)],
    "flip3": [(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)],
}


# ----------------------------------------------------------------------------- training
def build_bundle(args: argparse.Namespace, n_classes: int):
    if args.loss == "softmax+triplet":
        return build_loss(LossConfig(name="softmax"), n_classes, args.emb), build_loss(
            LossConfig(name="triplet", margin=args.margin, miner=args.miner), n_classes, args.emb
        )
    cfg = LossConfig(
        name=args.loss,
        margin=args.margin,
        scale=args.scale,
        miner=args.miner,
        options=json.loads(args.loss_options),
    )
    return build_loss(cfg, n_classes, args.emb), None


def make_encoder(args: argparse.Namespace) -> torch.nn.Module:
    cfg = ModelConfig(
        backbone=args.backbone,
        conv1_t_stride=args.stride,
        widen_factor=args.widen,
        embedding_dim=args.emb,
        head_hidden=2 * args.emb,
    )
    return build_encoder(cfg)


def _lr_lambda(total: int, warmup: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return f


def train_encoder(
    x: np.ndarray,
    y: np.ndarray,
    args: argparse.Namespace,
    seed: int,
    init_state: dict | None = None,
) -> dict[str, torch.nn.Module]:
    """Train one encoder; returns {"raw": model, "ema<decay>": weight EMA per ``--ema`` decay}."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    model = make_encoder(args)
    if init_state is not None:
        model.load_state_dict(init_state)
    bundle, extra = build_bundle(args, int(y.max()) + 1)
    params = [{"params": model.parameters(), "lr": args.lr, "weight_decay": args.wd}]
    for b in (bundle, extra):
        if b is not None and b.has_parameters:
            params.append({"params": b.loss.parameters(), "lr": args.loss_lr, "weight_decay": 0})
    opt = torch.optim.AdamW(params)
    # Few labels: at least 8 batches an epoch (PML repeats scans of a small class).
    length = max(len(y), 8 * args.batch)
    sampler = MPerClassSampler(y, m=args.mpc, batch_size=args.batch, length_before_new_iter=length)
    steps_per_epoch = len(sampler) // args.batch
    total = steps_per_epoch * args.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total, steps_per_epoch * args.warmup))
    # BatchNorm statistics are averaged too (use_buffers), so an EMA model needs no BN refit.
    emas = {
        f"ema{d}": AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(d), use_buffers=True)
        for d in args.ema
    }
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    g = torch.Generator().manual_seed(seed)
    spec = AUGS[args.aug]
    model.train()
    for epoch in range(args.epochs):
        torch.manual_seed(seed * 1000 + epoch)  # sampler draws from the global RNG
        idx = torch.tensor(list(iter(sampler)))[: steps_per_epoch * args.batch]
        for s in range(steps_per_epoch):
            bi = idx[s * args.batch : (s + 1) * args.batch]
            xb, yb = augment(xt[bi], spec, g), yt[bi]
            emb = model(xb)
            loss = _loss(bundle, emb, yb)
            if extra is not None:
                loss = loss + args.metric_weight * _loss(extra, emb, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            sched.step()
            for ema in emas.values():
                ema.update_parameters(model)
    out = {"raw": model, **emas}
    for m in out.values():
        m.eval()
    return out


def _loss(bundle, emb: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if bundle.miner is not None:
        return bundle.loss(emb, y, bundle.miner(emb, y))
    return bundle.loss(emb, y)


def pretrain_ntxent(x: np.ndarray, args: argparse.Namespace, seed: int) -> dict:
    """SimCLR: two augmented views per scan, PML NTXentLoss, labels unused."""
    torch.manual_seed(seed)
    model = make_encoder(args)
    loss_fn = pml_losses.NTXentLoss(temperature=args.ssl_temp)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.wd)
    steps_per_epoch = len(x) // args.ssl_batch
    total = steps_per_epoch * args.ssl_epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total, steps_per_epoch))
    xt = torch.from_numpy(x)
    g = torch.Generator().manual_seed(seed)
    spec = AUGS[args.ssl_aug]
    model.train()
    for _ in range(args.ssl_epochs):
        perm = torch.randperm(len(x), generator=g)
        for s in range(steps_per_epoch):
            xb = xt[perm[s * args.ssl_batch : (s + 1) * args.ssl_batch]]
            v = torch.cat([augment(xb, spec, g), augment(xb, spec, g)])
            lab = torch.arange(len(xb)).repeat(2)
            loss = loss_fn(model(v), lab)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.state_dict()


def cached_pretrain(x: np.ndarray, args: argparse.Namespace, seed: int) -> dict:
    """Pretrain once per (encoder, SSL settings, seed); later runs load the state dict."""
    keys = ("backbone", "widen", "stride", "emb", "lr", "wd", "ssl_epochs", "ssl_temp")
    key = "_".join(str(getattr(args, k)) for k in keys + ("ssl_aug", "ssl_batch")) + f"_{seed}"
    path = Path(tempfile.gettempdir()) / "medml-ssl-cache" / f"{key}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    state = pretrain_ntxent(x, args, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.rename(path)
    return state


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def embed(model: torch.nn.Module, x: np.ndarray, flips: list[tuple[int, ...]]) -> np.ndarray:
    """Mean of the embeddings of the flipped copies, renormalised (TTA); plain when no flips."""
    out = []
    for i in range(0, len(x), 128):
        xb = torch.from_numpy(x[i : i + 128])
        acc = 0
        for f in flips:
            acc = acc + model(xb.flip([2 + a for a in f]) if f else xb)
        out.append(F.normalize(acc / len(flips), dim=1))
    return torch.cat(out).numpy()


class Concat(torch.nn.Module):
    """Ensemble embedding: the members' unit embeddings concatenated and renormalised."""

    def __init__(self, members: list[torch.nn.Module]) -> None:
        super().__init__()
        self.members = torch.nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(torch.cat([m(x) for m in self.members], 1), dim=1)


def _fit_temperature(score: np.ndarray, y: np.ndarray, bias: float) -> float:
    """Max-likelihood 1/T for p = sigmoid(score / T + bias) on a calibration set (grid)."""
    best, best_nll = 1.0, np.inf
    for inv_t in np.exp(np.linspace(np.log(0.5), np.log(500), 80)):
        z = score * inv_t + bias
        nll = np.mean(np.logaddexp(0, z) - y * z)
        if nll < best_nll:
            best, best_nll = inv_t, nll
    return best


def decision_rules(
    s_emb: np.ndarray,
    s_y: np.ndarray,
    q_emb: np.ndarray,
    q_y: np.ndarray,
    seed: int,
    calib: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, tuple[float, float]]:
    """(ACC, AUROC) of each binary decision rule; support = training embeddings.

    Prior correction: p = sigmoid(d / T + log(pi1 / pi0)) with d the cosine difference to the
    two centroids; 1/T is fitted by cross-fitting on the query set (fit on one half, apply to
    the other), the honest stand-in for 'fitted on val'; with ``calib`` (val embeddings and
    labels) 1/T is fitted there instead, as the recipe does.
    """
    out = {}
    cents = np.stack([s_emb[s_y == c].mean(0) for c in (0, 1)])
    cents /= np.linalg.norm(cents, axis=1, keepdims=True)
    d = q_emb @ cents[1] - q_emb @ cents[0]
    out["nc"] = (np.mean((d > 0) == q_y), roc_auc_score(q_y, d))
    prior = s_y.mean()
    bias = math.log(prior / (1 - prior))
    if calib is not None:
        c_emb, c_y = calib
        inv_t = _fit_temperature(c_emb @ cents[1] - c_emb @ cents[0], c_y, bias)
        pred = d * inv_t + bias > 0
    else:
        half = np.random.default_rng(seed).permutation(len(q_y)) % 2 == 0
        pred = np.zeros(len(q_y), bool)
        for a, b in ((half, ~half), (~half, half)):
            inv_t = _fit_temperature(d[a], q_y[a], bias)
            pred[b] = d[b] * inv_t + bias > 0
    out["nc_prior"] = (np.mean(pred == q_y), out["nc"][1])
    for k in (2, 3):
        protos = []
        for c in (0, 1):
            km = KMeans(k, n_init=4, random_state=seed).fit(s_emb[s_y == c])
            p = km.cluster_centers_
            protos.append(p / np.linalg.norm(p, axis=1, keepdims=True))
        dk = (q_emb @ protos[1].T).max(1) - (q_emb @ protos[0].T).max(1)
        out[f"kmeans{k}"] = (np.mean((dk > 0) == q_y), roc_auc_score(q_y, dk))
    sim = q_emb @ s_emb.T
    for k in (10, 25):
        nn_idx = np.argsort(-sim, axis=1)[:, :k]
        frac = s_y[nn_idx].mean(1)
        out[f"knn{k}"] = (np.mean((frac > 0.5) == q_y), roc_auc_score(q_y, frac))
    for c in (0.1, 1.0):
        lr = LogisticRegression(C=c, max_iter=2000).fit(s_emb, s_y)
        p = lr.predict_proba(q_emb)[:, 1]
        out[f"logreg_c{c}"] = (np.mean((p > 0.5) == q_y), roc_auc_score(q_y, p))
    return out


def score_model(
    model, s_x, s_y, q_x, q_y, seed: int, tta: list[str], calib=None
) -> list[dict[str, float | str]]:
    rows = []
    for t in tta:
        s_emb, q_emb = embed(model, s_x, TTA_FLIPS[t]), embed(model, q_x, TTA_FLIPS[t])
        cal = None if calib is None else (embed(model, calib[0], TTA_FLIPS[t]), calib[1])
        mapr = retrieval_metrics(q_emb, q_y)["mean_average_precision_at_r"]
        for rule, (acc, auc) in decision_rules(s_emb, s_y, q_emb, q_y, seed, cal).items():
            rows.append({"tta": t, "rule": rule, "acc": acc, "auc": auc, "mapr": mapr})
    return rows


# ----------------------------------------------------------------------------- protocols
def subsample_per_class(y: np.ndarray, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.choice(np.flatnonzero(y == c), n, replace=False) for c in (0, 1)])


def splits(data, args) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """(fold name, train x, train y, held-out x, held-out y) per fold."""
    if args.protocol == "cv":
        x = np.concatenate([data["train"][0], data["val"][0]])
        y = np.concatenate([data["train"][1], data["val"][1]])
        skf = StratifiedKFold(args.folds, shuffle=True, random_state=args.cv_seed)
        folds = list(skf.split(x, y))
        use = args.only_folds or list(range(args.folds))
        return [
            (f"f{i}", x[folds[i][0]], y[folds[i][0]], x[folds[i][1]], y[folds[i][1]]) for i in use
        ]
    if args.protocol == "val":
        return [("val", *data["train"], *data["val"])]
    tx, ty = data["train"]
    if args.train_on_val:
        tx, ty = np.concatenate([tx, data["val"][0]]), np.concatenate([ty, data["val"][1]])
    return [("test", tx, ty, *data["test"])]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--name", required=True)
    p.add_argument("--protocol", choices=("cv", "val", "test"), default="cv")
    p.add_argument("--folds", type=int, default=3)
    p.add_argument("--only-folds", type=int, nargs="*")
    p.add_argument("--cv-seed", type=int, default=0)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--train-on-val", action="store_true")
    p.add_argument("--backbone", default="resnet10")
    p.add_argument("--widen", type=float, default=0.25)
    p.add_argument("--stride", type=int, default=2)
    p.add_argument("--emb", type=int, default=64)
    p.add_argument("--loss", default="triplet")
    p.add_argument("--margin", type=float)
    p.add_argument("--scale", type=float)
    p.add_argument(
        "--miner", help="a registry miner, or none [the loss's default: semihard for triplet]"
    )
    p.add_argument("--loss-options", default="{}", help='JSON, e.g. {"label_smoothing": 0.1}')
    p.add_argument("--metric-weight", type=float, default=1.0)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--loss-lr", type=float, default=1e-2)
    p.add_argument("--wd", type=float, default=1e-4)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--mpc", type=int, default=16)
    p.add_argument("--aug", default="shipped", choices=sorted(AUGS))
    p.add_argument("--ema", type=float, nargs="*", default=[], help="EMA decays per step")
    p.add_argument("--tta", nargs="+", default=["none", "flip3"], choices=sorted(TTA_FLIPS))
    p.add_argument("--labels-per-class", type=int, default=0, help="0 = all labels")
    p.add_argument("--pretrain", action="store_true", help="NT-Xent on all train+val first")
    p.add_argument("--ssl-epochs", type=int, default=40)
    p.add_argument("--ssl-batch", type=int, default=64, help="scans per batch (2 views each)")
    p.add_argument("--ssl-temp", type=float, default=0.1)
    p.add_argument("--ssl-aug", default="flip3_rot90_aff", choices=sorted(AUGS))
    p.add_argument("--ens", type=int, default=1, help="members per ensemble (concat embeddings)")
    p.add_argument("--out", type=Path, default=Path("bench/results/recipe_runs.csv"))
    p.add_argument(
        "--dump",
        type=Path,
        help="folder: save each fold's raw 8-flip TTA embeddings (support, held-out, val) as"
        " <name>_s<seed>_<fold>.npz, to study decision rules offline without retraining",
    )
    p.add_argument("--npz", type=Path, default=NPZ)
    args = p.parse_args()

    torch.set_num_threads(1)
    data = load_npz(args.npz)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    # Test protocol: the prior-correction temperature is fitted on val, never on test.
    calib = data["val"] if args.protocol == "test" and not args.train_on_val else None
    for seed in args.seeds:
        init = None
        if args.pretrain:  # labels unused: every train+val scan (never test)
            t0 = time.time()
            x_all = np.concatenate([data["train"][0], data["val"][0]])
            init = cached_pretrain(x_all, args, seed)
            print(f"pretrain seed {seed}: {time.time() - t0:.0f}s", flush=True)
        for fold, tx, ty, qx, qy in splits(data, args):
            if args.labels_per_class:
                keep = subsample_per_class(ty, args.labels_per_class, seed)
                tx, ty = tx[keep], ty[keep]
            t0 = time.time()
            members = [train_encoder(tx, ty, args, seed, init)]
            wall = time.time() - t0
            variants = list(members[0].items())
            # --ens N: N-1 more members on the same training data (other seeds); their
            # concatenated embeddings measure what an ensemble of fold models gains.
            for k in range(1, args.ens):
                members.append(train_encoder(tx, ty, args, seed + 100 * k, init))
            if args.ens > 1:
                variants += [
                    (f"ens{args.ens}_{v}", Concat([mm[v] for mm in members])) for v, _ in variants
                ]
            if args.dump is not None:
                _dump(args, seed, fold, members[0]["raw"], tx, ty, qx, qy, data["val"])
                if args.ens > 1:
                    ens = Concat([mm["raw"] for mm in members])
                    _dump(args, seed, fold, ens, tx, ty, qx, qy, data["val"], f"ens{args.ens}")
            rows = []
            for vname, m in variants:
                for r in score_model(m, tx, ty, qx, qy, seed, args.tta, calib):
                    rows.append({"model": vname, **r})
            _append(args, config, seed, fold, wall, rows)
            best = max(rows, key=lambda r: r["auc"])
            print(
                f"{args.name} seed {seed} {fold}: {wall:.0f}s  "
                + "  ".join(
                    f"{r['model']}/{r['tta']}/{r['rule']} acc {r['acc']:.3f} auc {r['auc']:.3f}"
                    for r in rows
                    if r["rule"] in ("nc", "nc_prior", "logreg_c1.0")
                )
                + f"  best-auc {best['model']}/{best['tta']}/{best['rule']}",
                flush=True,
            )


def _dump(args, seed, fold, model, tx, ty, qx, qy, val, tag: str = "") -> None:
    """The raw model's 8-flip TTA embeddings of the fold's support, held-out and val scans."""
    args.dump.mkdir(parents=True, exist_ok=True)
    f = TTA_FLIPS["flip3"]
    np.savez_compressed(
        args.dump / f"{args.name}{tag and '_' + tag}_s{seed}_{fold}.npz",
        s_emb=embed(model, tx, f),
        s_y=ty,
        q_emb=embed(model, qx, f),
        q_y=qy,
        v_emb=embed(model, val[0], f),
        v_y=val[1],
    )


def _append(args, config, seed, fold, wall, rows) -> None:
    new = not args.out.exists()
    fields = ["name", "protocol", "seed", "fold", "wall_s", "model", "tta", "rule"]
    fields += ["acc", "auc", "mapr", "config"]
    with open(args.out, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        if new:
            w.writeheader()
        for r in rows:
            w.writerow(
                {
                    "name": args.name,
                    "protocol": args.protocol,
                    "seed": seed,
                    "fold": fold,
                    "wall_s": round(wall, 1),
                    **r,
                    "config": json.dumps(config, sort_keys=True),
                }
            )
        f.flush()
        os.fsync(f.fileno())


if __name__ == "__main__":
    main()

"""Label efficiency: test accuracy and AUROC against labelled patients per class.

For each budget (patients per class drawn from the train split, seeded; ``all`` = the whole
split), each loss, with and without contrastive pretraining (``medml pretrain`` on every
non-test scan, labels unused) and each seed, train with the validation split choosing the
epoch and report the test metrics once. Writes ``label_efficiency.csv``, a markdown table
(mean +- 95 % CI over seeds) and a PNG of both curves.

    .venv/bin/python bench/label_efficiency.py --config configs/adrenalmnist3d.yaml \
        --workspace workspace-adrenal --budgets 5,10,25,50,all --seeds 3 --out docs/

For classes never trained on (synthetic CT with ``--novel``), ``--novel`` instead reports
N-way K-shot episode accuracy on the novel classes for K in ``--shots`` (1,5,10), training on
the base classes only; ``--encoders`` adds contrastive pretraining (``pretrained``: labels
never used, ``pretrained+base``: then fine-tuned on the base classes):

    .venv/bin/python bench/label_efficiency.py --config configs/novel-ct.yaml \
        --workspace workspace-novel --novel --shots 1,5,10 --seeds 3 \
        --encoders base,pretrained,pretrained+base --losses triplet --out docs/
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import stats

from medml.catalog import Catalog
from medml.config import load_settings
from medml.data.splits import ensure_splits
from medml.evaluate.run import evaluate_run
from medml.metrics import fewshot_episodes
from medml.models.encoder import load_encoder
from medml.models.inference import embed_scans
from medml.train import train
from medml.train.pretrain import pretrain
from medml.workspace import Workspace


def subsample(scans: list[dict], per_class: int | None, seed: int) -> list[dict]:
    """``per_class`` patients of each class (all their scans); None: every scan."""
    if per_class is None:
        return scans
    rng = np.random.default_rng(seed)
    out = []
    for label in sorted({s["label"] for s in scans}):
        patients = sorted({s["patient_key"] for s in scans if s["label"] == label})
        keep = set(rng.choice(patients, size=min(per_class, len(patients)), replace=False))
        out += [s for s in scans if s["label"] == label and s["patient_key"] in keep]
    return out


def ci95(values: list[float]) -> float:
    """Half-width of the Student-t 95 % CI of the mean (with 3 seeds t = 4.30, not 1.96: a
    normal CI over so few runs would be half as wide as it should be)."""
    v = np.asarray([x for x in values if x == x], dtype=float)
    if len(v) < 2:
        return 0.0
    return float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))


def run_budgets(args, settings, ws: Workspace) -> pd.DataFrame:
    catalog = Catalog(ws.catalog_url)
    ensure_splits(catalog, settings.split)
    train_all = catalog.list_scans("train", class_set="base")
    rows = []
    for seed in range(args.seeds):
        init = None
        if args.pretrain:
            s = settings.model_copy(
                update={"pretrain": settings.pretrain.model_copy(update={"seed": seed})}
            )
            init = f"runs:/{pretrain(s, ws, progress=False).run_id}"
        for budget in args.budgets.split(","):
            per_class = None if budget == "all" else int(budget)
            scans = subsample(train_all, per_class, seed)
            for loss in args.losses.split(","):
                for pre in [None, init] if init else [None]:
                    one = settings.model_copy(
                        update={
                            "loss": settings.loss.model_copy(
                                update={"name": loss, "margin": None, "scale": None,
                                        "miner": None, "options": {}}
                            ),
                            "model": settings.model.model_copy(update={"init_from": pre}),
                            "train": settings.train.model_copy(update={"seed": seed}),
                        }
                    )  # fmt: skip
                    fit = train(one, ws, progress=False, train_scans=scans,
                                run_name=f"{loss} · {budget}/class · seed {seed}")  # fmt: skip
                    m = evaluate_run(fit.run_id, one, ws, fit.checkpoint, figures=False)
                    rows.append(
                        {"budget": budget, "loss": loss, "pretrained": pre is not None,
                         "seed": seed, "accuracy": m["accuracy"], "auroc": m["auroc"]}
                    )  # fmt: skip
                    print(rows[-1], flush=True)
    return pd.DataFrame(rows)


def novel_episodes(emb, scans: list[dict], e, shots: int, seed: int) -> dict[str, dict]:
    """K-shot episodes on the novel scans, two ways of drawing them.

    ``pool``: support and queries from every novel scan (never overlapping in an episode).
    ``heldout``: support from the novel train/val scans, queries from the novel test scans
    only: the images contrastive pretraining never saw (it leaves the test split out), so a
    pretrained encoder cannot have memorised them even without their labels.
    """
    labels = emb.labels
    test = np.array([s.get("split") == "test" for s in scans])
    pool = fewshot_episodes(emb.emb, labels, emb.emb, labels, e.ways, shots, e.queries,
                            e.episodes, seed)  # fmt: skip
    held = fewshot_episodes(emb.emb[~test], labels[~test], emb.emb[test], labels[test], e.ways,
                            shots, e.queries, e.episodes, seed)  # fmt: skip
    return {"pool": pool, "heldout": held}


def run_novel(args, settings, ws: Workspace) -> pd.DataFrame:
    """Train on base classes, then K-shot episodes on the novel classes (never trained on).

    ``--encoders`` picks what is embedded: ``base`` (trained on the base classes from random
    weights), ``pretrained`` (contrastive pretraining on every non-test scan, labels unused,
    no base training), ``pretrained+base`` (the pretrained encoder fine-tuned on the base
    classes).
    """
    catalog = Catalog(ws.catalog_url)
    ensure_splits(catalog, settings.split)
    novel = catalog.list_scans(class_set="novel")
    kinds = args.encoders.split(",")
    rows = []
    for seed in range(args.seeds):
        encoders: dict[str, tuple] = {}
        init = None
        if any(k.startswith("pretrained") for k in kinds):
            s = settings.model_copy(
                update={"pretrain": settings.pretrain.model_copy(update={"seed": seed})}
            )
            pre = pretrain(s, ws, progress=False)
            init = f"runs:/{pre.run_id}"
            if "pretrained" in kinds:
                encoders["pretrained"] = ("-", load_encoder(settings.model, pre.checkpoint))
        for loss in args.losses.split(","):
            for kind in (k for k in kinds if k in ("base", "pretrained+base")):
                one = settings.model_copy(
                    update={
                        "loss": settings.loss.model_copy(
                            update={"name": loss, "margin": None, "scale": None, "miner": None}
                        ),
                        "model": settings.model.model_copy(
                            update={"init_from": init if kind == "pretrained+base" else None}
                        ),
                        "train": settings.train.model_copy(update={"seed": seed}),
                    }
                )
                fit = train(one, ws, progress=False, run_name=f"{loss} · {kind} · seed {seed}")
                encoders[f"{kind}/{loss}"] = (loss, load_encoder(one.model, fit.checkpoint))
        for name, (loss, enc) in encoders.items():
            emb = embed_scans(enc, ws, settings.preprocess, novel, settings.evaluate.batch_size)
            for shots in (int(k) for k in args.shots.split(",")):
                for draw, fs in novel_episodes(emb, novel, settings.evaluate, shots, seed).items():
                    rows.append({"encoder": name.split("/")[0], "loss": loss, "episodes": draw,
                                 "shots": shots, "ways": fs["ways"], "seed": seed,
                                 "accuracy": fs["accuracy"]})  # fmt: skip
                    print(rows[-1], flush=True)
    return pd.DataFrame(rows)


def summarise(frame: pd.DataFrame, by: list[str], metrics: list[str]) -> pd.DataFrame:
    agg = []
    for key, g in frame.groupby(by, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip(by, key))
        for m in metrics:
            row[m] = float(g[m].mean())
            row[f"{m}_ci95"] = ci95(g[m].tolist())
        row["seeds"] = len(g)
        agg.append(row)
    return pd.DataFrame(agg)


def markdown(summary: pd.DataFrame) -> str:
    """The summary as a markdown table: ``mean ± CI`` per metric."""
    keys = [c for c in summary.columns if c not in ("seeds",) and not c.endswith("_ci95")]
    metrics = [c for c in keys if f"{c}_ci95" in summary.columns]
    head = [c for c in keys if c not in metrics] + metrics + ["seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in summary.iterrows():
        cells = [str(r[c]) for c in head if c not in metrics and c != "seeds"]
        cells += [f"{r[m]:.3f} ± {r[m + '_ci95']:.3f}" for m in metrics] + [str(r["seeds"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary: pd.DataFrame, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    order = list(dict.fromkeys(summary["budget"]))
    xs = np.arange(len(order))
    for (loss, pre), g in summary.groupby(["loss", "pretrained"], sort=False):
        g = g.set_index("budget").reindex(order)
        for ax, m in zip(axes, ("accuracy", "auroc")):
            name = f"{loss} + pretrain" if pre else loss
            style = "--" if pre else "-"
            ax.errorbar(xs, g[m], yerr=g[f"{m}_ci95"], marker="o", capsize=3, linestyle=style,
                        label=name)  # fmt: skip
    for ax, m in zip(axes, ("test accuracy", "test AUROC")):
        ax.set_xticks(xs, order)
        ax.set_xlabel("labelled patients per class")
        ax.set_ylabel(m)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def _in_table_order(frame: pd.DataFrame) -> pd.DataFrame:
    """Runs of several files in one table order: budgets ascending (``all`` last), the losses
    as the default ``--losses`` lists them, then the rest of the keys."""
    losses = {name: i for i, name in enumerate(["softmax", "triplet", "arcface", "adacos"])}
    keys = pd.DataFrame(index=frame.index)
    if "budget" in frame:
        keys["b"] = [10**9 if b == "all" else int(b) for b in frame["budget"]]
    keys["l"] = [losses.get(name, len(losses)) for name in frame["loss"]]
    order = keys.sort_values(list(keys.columns), kind="stable").index
    return frame.loc[order].reset_index(drop=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--workspace")
    parser.add_argument("--budgets", default="5,10,25,50,all")
    parser.add_argument("--losses", default="softmax,triplet,arcface,adacos")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--pretrain", action="store_true", help="also with pretraining")
    parser.add_argument("--novel", action="store_true", help="novel-class K-shot episodes")
    parser.add_argument("--shots", default="1,5,10")
    parser.add_argument(
        "--encoders",
        default="base",
        help="--novel: comma list of base, pretrained, pretrained+base",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="docs")
    parser.add_argument(
        "--from-runs",
        nargs="+",
        type=Path,
        help="no training: summarise these *_runs.csv files (concatenated) into --out",
    )
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.from_runs:
        runs = [pd.read_csv(f, dtype={"budget": str}) for f in args.from_runs]
        frame = pd.concat(runs, ignore_index=True)
        frame = _in_table_order(frame)
    elif not (args.config and args.workspace):
        parser.error("--config and --workspace are required unless --from-runs is given")
    else:
        torch.set_num_threads(args.threads)
        settings = load_settings(args.config, args.overrides)
        ws = Workspace.resolve(args.workspace)
    if args.novel:
        frame = frame if args.from_runs else run_novel(args, settings, ws)
        summary = summarise(frame, ["encoder", "loss", "episodes", "ways", "shots"], ["accuracy"])
        stem = "novel_shots"
    else:
        frame = frame if args.from_runs else run_budgets(args, settings, ws)
        summary = summarise(frame, ["budget", "loss", "pretrained"], ["accuracy", "auroc"])
        plot(summary, out / "label_efficiency.png")
        stem = "label_efficiency"
    frame.to_csv(out / f"{stem}_runs.csv", index=False)
    summary.to_csv(out / f"{stem}.csv", index=False)
    print(markdown(summary))


if __name__ == "__main__":
    main()

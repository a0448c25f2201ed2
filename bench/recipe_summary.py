"""Aggregate bench/results/recipe_runs.csv: mean +- sd over folds x seeds per variant.

python bench/recipe_summary.py [--rule nc_prior] [--names a b ...] [--protocol cv]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--csv", type=Path, default=Path("bench/results/recipe_runs.csv"))
    p.add_argument("--protocol", default="cv")
    p.add_argument("--rule", nargs="*", help="keep only these decision rules")
    p.add_argument("--model", nargs="*", help="raw / ema")
    p.add_argument("--tta", nargs="*")
    p.add_argument("--names", nargs="*")
    p.add_argument("--folds", nargs="*", help="keep only these folds (e.g. f0 f1)")
    p.add_argument("--ref", help="also report the paired difference to this run, fold by fold")
    p.add_argument("--md", type=Path, help="also write the table as markdown here")
    a = p.parse_args()
    df = pd.read_csv(a.csv)
    df = df[df.protocol == a.protocol]
    names = a.names + [a.ref] if a.names and a.ref else a.names
    filters = (("rule", a.rule), ("model", a.model), ("tta", a.tta), ("name", names))
    for col, keep in filters + (("fold", a.folds),):
        if keep:
            df = df[df[col].isin(keep)]
    if a.ref:
        key = ["seed", "fold", "model", "tta", "rule"]
        ref = df[df.name == a.ref].set_index(key)[["acc", "auc"]]
        ref.columns = ["acc_ref", "auc_ref"]
        both = df.join(ref, on=key).dropna(subset=["auc_ref"])
        both["d_acc"], both["d_auc"] = both.acc - both.acc_ref, both.auc - both.auc_ref
        df = both
    g = df.groupby(["name", "model", "tta", "rule"], sort=False)
    t = g.agg(
        n=("acc", "size"),
        acc=("acc", "mean"),
        acc_sd=("acc", "std"),
        auc=("auc", "mean"),
        auc_sd=("auc", "std"),
        mapr=("mapr", "mean"),
        fold_wall_s=("wall_s", "mean"),
        **(
            {"d_acc": ("d_acc", "mean"), "d_auc": ("d_auc", "mean"), "d_auc_sd": ("d_auc", "std")}
            if a.ref
            else {}
        ),
    ).reset_index()
    pd.set_option("display.width", 200)
    pd.set_option("display.max_rows", 500)
    print(t.round(3).to_string(index=False))
    if a.md:
        a.md.write_text(_markdown(t.round(3)))


def _markdown(t: pd.DataFrame) -> str:
    """A markdown table without the optional tabulate dependency."""
    head = "| " + " | ".join(t.columns) + " |\n|" + "---|" * len(t.columns) + "\n"
    return head + "".join("| " + " | ".join(map(str, r)) + " |\n" for r in t.itertuples(False))


if __name__ == "__main__":
    main()

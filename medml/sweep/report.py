"""What the person comparing reads: the table, the verdict, the figure.

The markdown goes into the parent run's description (MLflow's ``mlflow.note.content`` tag,
rendered on the run page), the figure is a parent artifact.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from medml.sweep.stats import MeanCI, Verdict, mean_ci  # noqa: E402

TABLE_METRICS = (
    "mean_average_precision_at_r",
    "precision_at_1",
    "r_precision",
    "accuracy",
    "balanced_accuracy",
    "auroc",
    "kappa_quadratic",
    "fewshot_accuracy",
)
SHORT = {
    "mean_average_precision_at_r": "MAP@R",
    "precision_at_1": "P@1",
    "r_precision": "R-prec.",
    "accuracy": "accuracy",
    "balanced_accuracy": "bal. acc.",
    "auroc": "AUROC",
    "kappa_quadratic": "kappa",
    "fewshot_accuracy": "few-shot",
}
# One colour per loss, the same in the figure and in the MLflow UI (``mlflow.runColor``).
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")


@dataclass
class LossSummary:
    """One loss's line: its tuning and its final fits' test metrics (by pair key)."""

    loss: str
    trials: int
    pruned: int
    cv_score: float  # best trial's mean validation MAP@R over the folds
    best_params: dict[str, Any]
    epochs: int
    fold_curves: list[list[float]]  # best trial's validation curve per fold
    test: dict[str, dict[str, float]] = field(default_factory=dict)  # metric -> pair -> value
    run_id: str = ""

    def stat(self, metric: str) -> MeanCI:
        return mean_ci(list(self.test.get(metric, {}).values()))


def test_values(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The table's metrics from one ``evaluate_run`` result (few-shot accuracy flattened)."""
    flat = {m: metrics.get(m) for m in TABLE_METRICS}
    flat["fewshot_accuracy"] = (metrics.get("fewshot") or {}).get("accuracy")
    return {k: float(v) for k, v in flat.items() if isinstance(v, int | float)}


def _cell(s: MeanCI) -> str:
    if s.n == 0 or not np.isfinite(s.mean):
        return "–"
    return f"{s.mean:.3f}" if s.n == 1 else f"{s.mean:.3f} ± {s.ci95:.3f}"


def _params(params: Mapping[str, Any]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    return ", ".join(f"{k}={fmt(v)}" for k, v in sorted(params.items())) or "–"


def markdown(
    summaries: Sequence[LossSummary],
    verdict: Verdict,
    metric: str,
    budget: str,
    pairing: str = "same seeds",
) -> str:
    """The comparison table, the paired comparisons and the verdict, as markdown."""
    metrics = [m for m in TABLE_METRICS if any(s.stat(m).n for s in summaries)]
    head = ["loss", "trials (pruned)", "CV val MAP@R", "epochs"]
    head += [f"test {SHORT[m]}" for m in metrics]
    lines = [
        f"**Verdict:** {verdict.text}.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for s in summaries:
        cells = [
            f"**{s.loss}**" if s.loss == verdict.winner else s.loss,
            f"{s.trials} ({s.pruned})",
            f"{s.cv_score:.3f}" if np.isfinite(s.cv_score) else "–",
            str(s.epochs),
            *[_cell(s.stat(m)) for m in metrics],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Compared on test {SHORT.get(metric, metric)}; {budget}. "
        "Test values: mean ± 95 % CI over the final fits.",
        "",
        f"Paired comparisons ({pairing}):",
        "",
    ]
    short = SHORT.get(metric, metric)
    lines += [f"- {c.describe(short)}" for c in verdict.comparisons] or ["- none"]
    lines += ["", "Best settings found:", ""]
    lines += [f"- {s.loss}: {_params(s.best_params)}" for s in summaries]
    return "\n".join(lines) + "\n"


def rows(summaries: Sequence[LossSummary]) -> list[dict[str, Any]]:
    """One row per loss (CSV): mean and CI half-width of each metric."""
    out = []
    for s in summaries:
        row: dict[str, Any] = {
            "loss": s.loss, "trials": s.trials, "pruned": s.pruned, "cv_score": s.cv_score,
            "epochs": s.epochs, "run_id": s.run_id,
        }  # fmt: skip
        for m in TABLE_METRICS:
            st = s.stat(m)
            if st.n:
                row[m], row[f"{m}_ci95"], row[f"{m}_n"] = st.mean, st.ci95, st.n
        out.append(row)
    return out


def figure(summaries: Sequence[LossSummary], metric: str, out: Path) -> Path:
    """Left: each loss's final test values and mean ± 95 % CI; right: the validation curves
    of each loss's best trial, one line per fold."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, s in enumerate(summaries):
        colour = PALETTE[i % len(PALETTE)]
        values = [v for v in s.test.get(metric, {}).values() if np.isfinite(v)]
        st = s.stat(metric)
        left.scatter([i] * len(values), values, color=colour, alpha=0.45, s=16)
        if st.n:
            left.errorbar(i + 0.15, st.mean, yerr=st.ci95, fmt="o", color=colour, capsize=5)
        for k, curve in enumerate(s.fold_curves):
            epochs = np.arange(1, len(curve) + 1)
            style = ("-", "--", ":", "-.")[k % 4]
            label = s.loss if k == 0 else None
            right.plot(epochs, curve, color=colour, alpha=0.8, lw=1.2, ls=style, label=label)
    left.set_xticks(range(len(summaries)), [s.loss for s in summaries])
    left.set_ylabel(f"test {SHORT.get(metric, metric)}")
    left.set_title("final fits (dots) and mean ± 95 % CI")
    right.set_xlabel("epoch")
    right.set_ylabel("validation MAP@R")
    right.set_title("best trial per loss: one line per fold")
    if summaries:
        right.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out

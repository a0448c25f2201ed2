"""The statistics of the comparison: mean ± 95 % CI, paired differences, the verdict.

Pairs are fits that share everything but the loss: the same seed (and, with
``sweep.final: folds``, the same fold). The paired bootstrap (numpy, seeded) gives the CI of
the mean difference; scipy's Wilcoxon signed-rank test gives its p-value. A difference counts
only when both agree: the CI excludes 0 and p < alpha. With n pairs the smallest two-sided
exact Wilcoxon p is 2 / 2^n, so fewer than 6 pairs can never pass at alpha = 0.05: the
protocol then answers "no loss is better than the baseline here", which is what so few runs
can support.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class MeanCI:
    mean: float
    ci95: float  # half-width (Student t); 0 for a single value
    n: int


@dataclass(frozen=True)
class Paired:
    """``a`` minus ``b`` over their common pairs."""

    a: str
    b: str
    n: int
    mean_diff: float
    ci_low: float
    ci_high: float
    p_value: float
    significant: bool

    def describe(self, metric: str) -> str:
        if self.n == 0:
            return f"{self.a} vs {self.b}: no common pairs"
        pairs = f"{self.n} pair{'s' if self.n > 1 else ''}"
        return (
            f"{self.a} − {self.b}: {self.mean_diff:+.3f} {metric} "
            f"(95 % CI {self.ci_low:+.3f} to {self.ci_high:+.3f}, Wilcoxon p = {self.p_value:.3f}, "
            f"{pairs}){' — significant' if self.significant else ''}"
        )


def mean_ci(values: Sequence[float]) -> MeanCI:
    """Mean and 95 % CI half-width (t distribution: 1.96 would be too narrow for 3 seeds)."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if len(v) == 0:
        return MeanCI(float("nan"), float("nan"), 0)
    if len(v) == 1:
        return MeanCI(float(v[0]), 0.0, 1)
    half = stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))
    return MeanCI(float(v.mean()), float(half), len(v))


def paired(
    a: str,
    b: str,
    scores_a: Mapping[str, float],
    scores_b: Mapping[str, float],
    alpha: float = 0.05,
    resamples: int = 10000,
    seed: int = 0,
) -> Paired:
    """Compare two losses on the pairs (keys) they share; NaN scores drop their pair."""
    keys = sorted(
        k for k in set(scores_a) & set(scores_b)
        if math.isfinite(scores_a[k]) and math.isfinite(scores_b[k])
    )  # fmt: skip
    diff = np.asarray([scores_a[k] - scores_b[k] for k in keys], dtype=float)
    if len(diff) == 0:
        nan = float("nan")
        return Paired(a, b, 0, nan, nan, nan, nan, False)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(resamples, len(diff)))].mean(axis=1)
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    if np.all(diff == 0):
        p = 1.0
    else:
        p = float(stats.wilcoxon(diff, zero_method="zsplit", method="auto").pvalue)
    significant = bool(p < alpha and (low > 0 or high < 0))
    return Paired(a, b, len(diff), float(diff.mean()), float(low), float(high), p, significant)


@dataclass(frozen=True)
class Verdict:
    winner: str  # a loss, or "none"
    significant: bool
    text: str
    comparisons: tuple[Paired, ...]


NO_WINNER = "no loss is better than the baseline here"


def verdict(
    scores: Mapping[str, Mapping[str, float]],
    baseline: str | None,
    metric: str,
    alpha: float = 0.05,
    resamples: int = 10000,
    seed: int = 0,
) -> Verdict:
    """Who wins on ``metric``, if anyone does beyond the noise.

    ``scores[loss][pair]``. Compared: every loss against the baseline, and the top two by
    mean. The leader is the winner only when it beats the baseline (unless it is the
    baseline) and the runner-up, each significantly.
    """
    means = {loss: mean_ci(list(s.values())).mean for loss, s in scores.items()}
    ranked = sorted((m for m in means if math.isfinite(means[m])), key=lambda m: -means[m])
    if len(ranked) < 2:
        return Verdict("none", False, f"fewer than two losses have a {metric}", ())

    def cmp(a: str, b: str) -> Paired:
        return paired(a, b, scores[a], scores[b], alpha, resamples, seed)

    has_base = baseline in scores and baseline in ranked
    against_base = [cmp(m, baseline) for m in ranked if has_base and m != baseline]
    leader, runner_up = ranked[0], ranked[1]
    top_two = cmp(leader, runner_up)
    comparisons = tuple(against_base) + (
        (top_two,) if not has_base or baseline not in (leader, runner_up) else ()
    )
    beats_base = {c.a for c in against_base if c.significant and c.mean_diff > 0}
    if has_base and leader == baseline:
        if top_two.significant:
            return Verdict(
                leader, True, f"{NO_WINNER}: the {baseline} baseline leads, ahead of "
                f"{runner_up} beyond the noise ({top_two.describe(metric)})", comparisons,
            )  # fmt: skip
        return Verdict("none", False, f"{NO_WINNER} ({baseline} leads on the mean)", comparisons)
    if has_base and leader not in beats_base:
        base = next(c for c in against_base if c.a == leader)
        return Verdict(
            "none", False, f"{NO_WINNER}: {leader} leads, but {base.describe(metric)}", comparisons
        )
    if not top_two.significant:
        others = "both beat the baseline, but " if has_base and runner_up in beats_base else ""
        return Verdict(
            "none", False,
            f"no single winner: {leader} and {runner_up} {others}cannot be told apart "
            f"({top_two.describe(metric)})",
            comparisons,
        )  # fmt: skip
    why = f"ahead of {runner_up}" + (f" and of the {baseline} baseline" if has_base else "")
    return Verdict(leader, True, f"{leader} wins on {metric}, {why} beyond the noise", comparisons)

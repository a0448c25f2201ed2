"""Champion/challenger: compare two registered versions on a validation set, move the alias."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from medml.fewshot.prototypes import UNKNOWN
from medml.predict.pyfunc import MedmlModel, load_medml_model
from medml.registry.register import embed_labelled


@dataclass
class Promotion:
    """The outcome of :func:`promote`, with the numbers behind it."""

    promoted: bool
    reason: str
    champion_version: str | None  # after the decision
    challenger_version: str
    scores: dict[str, dict[str, float]] = field(default_factory=dict)  # 'champion'/'challenger'


def score(model: MedmlModel, validation: list[tuple[str, str]]) -> dict[str, float]:
    """Accuracy ('unknown' and unreadable count as wrong) and mean NLL of the true class."""
    emb, labels, _, _ = embed_labelled(model, validation, "validation")
    d = model.prototypes.decide(emb, k=0)
    index = {c: i for i, c in enumerate(model.prototypes.classes)}
    p_true = np.array(
        [d.probs[i, index[lab]] if lab in index else 0.0 for i, lab in enumerate(labels)]
    )
    hits = [n == lab and n != UNKNOWN for n, lab in zip(d.names, labels)]
    return {
        "accuracy": float(np.mean(hits)),
        "nll": float(-np.log(np.clip(p_true, 1e-12, None)).mean()),
        "n": float(len(labels)),
    }


def _version(client: MlflowClient, name: str, alias: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def promote(
    name: str,
    validation: list[tuple[str, str]],
    champion: str = "champion",
    challenger: str = "challenger",
) -> Promotion:
    """Point ``champion`` at the ``challenger`` version when it scores better on ``validation``.

    Better: higher accuracy, or equal accuracy and lower NLL. Without a champion, the
    challenger becomes champion. The decision is recorded as tags on the challenger version.
    """
    client = MlflowClient()
    chal = _version(client, name, challenger)
    if chal is None:
        raise ValueError(f"{name} has no @{challenger} version to compare")
    champ = _version(client, name, champion)
    scores = {"challenger": score(load_medml_model(f"models:/{name}/{chal}"), validation)}
    c = scores["challenger"]
    if champ is None:
        promoted = True
        reason = f"no @{champion} yet; challenger v{chal} accuracy {c['accuracy']:.3f}"
    elif champ == chal:
        promoted, reason = False, f"@{challenger} and @{champion} are the same version v{chal}"
    else:
        scores["champion"] = score(load_medml_model(f"models:/{name}/{champ}"), validation)
        h = scores["champion"]
        better = c["accuracy"] > h["accuracy"] or (
            c["accuracy"] == h["accuracy"] and c["nll"] < h["nll"]
        )
        verdict = "better" if better else "not better"
        promoted = better
        reason = (
            f"challenger v{chal} is {verdict} than champion v{champ} on {int(c['n'])} validation "
            f"scans: accuracy {c['accuracy']:.3f} vs {h['accuracy']:.3f}, "
            f"NLL {c['nll']:.3f} vs {h['nll']:.3f}"
        )
    if promoted:
        client.set_registered_model_alias(name, champion, chal)
    client.set_model_version_tag(name, chal, "promotion", reason)
    return Promotion(promoted, reason, chal if promoted else champ, chal, scores)

"""The loss and miner registries, pytorch-metric-learning style: a loss is separate from its
miner, and any miner goes with any loss that accepts mined tuples.

Options the config does not set keep the library's own defaults: the shortcut fields
``margin``, ``scale`` and ``temperature`` and the free ``options`` mapping are passed to the
constructor only when given. A miner that has a ``margin`` mines with the loss's margin unless
``miner_options`` sets its own (semi-hard triplets are semi-hard relative to the loss margin).

To add a loss: write its ``nn.Module`` in its own file under ``medml/losses/`` (PML's
``forward(embeddings, labels[, indices_tuple])`` signature) and register it below with one
``LOSSES.register`` line. ``space`` is the search space the loss comparison (``medml sweep``)
tunes for it, with the same budget for every loss (see ``medml.sweep``).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Literal

from medml.extensions import Registry, import_object

# A search-space entry: ("float", low, high, log) | ("int", low, high) | ("categorical", [...]).
Space = dict[str, tuple]


@dataclass(frozen=True)
class LossSpec:
    """How to build one loss.

    ``kind``: ``pair`` losses weigh pairs/triplets of a batch (they take mined tuples);
    ``classifier`` losses hold class weights or proxies (``num_classes``, ``embedding_size``)
    that are trained in their own parameter group.
    """

    target: str
    kind: Literal["pair", "classifier"]
    shortcuts: dict[str, str] = field(default_factory=dict)  # config field -> constructor arg
    accepts_miner: bool = True
    default_miner: str | None = None
    space: Space = field(default_factory=dict)
    doc: str = ""


@dataclass(frozen=True)
class MinerSpec:
    """How to build one miner: a class and the options that define this variant."""

    target: str
    options: dict[str, Any] = field(default_factory=dict)
    doc: str = ""


LOSSES: Registry[LossSpec] = Registry("loss")
MINERS: Registry[MinerSpec] = Registry("miner")
NO_MINER = "none"

_PML = "pytorch_metric_learning.losses."
_MARGIN = {"margin": "margin"}
_MARGIN_SCALE = {"margin": "margin", "scale": "scale"}

# Shared parts of the search spaces: every loss tunes the encoder's learning rate; losses with
# class weights or proxies also tune theirs (``train.loss_lr``), which sets how fast the
# proxies move relative to the embedding (Musgrave et al. tune it per loss as well).
_LR = {"train.lr": ("float", 2e-4, 3e-3, True)}
_LOSS_LR = {"train.loss_lr": ("float", 1e-3, 1e-1, True)}
_SCALE = {"scale": ("float", 4.0, 64.0, True)}
_TRIPLET_MINERS = {"miner": ("categorical", ["semihard", "hard", "all", "batch-hard"])}

LOSSES.register(
    "triplet",
    LossSpec(_PML + "TripletMarginLoss", "pair", _MARGIN, default_miner="semihard",
             space={**_LR, "margin": ("float", 0.05, 0.5, False), **_TRIPLET_MINERS},
             doc="triplet margin loss (Schroff et al. 2015); mines semi-hard triplets by default"),
)  # fmt: skip
LOSSES.register(
    "contrastive",
    LossSpec(_PML + "ContrastiveLoss", "pair", {"margin": "neg_margin"},
             space={**_LR, "margin": ("float", 0.3, 1.0, False),
                    "miner": ("categorical", ["none", "pair-margin"])},
             doc="contrastive pairs (Hadsell et al. 2006); margin is the negative margin"),
)  # fmt: skip
LOSSES.register(
    "multi-similarity",
    LossSpec(_PML + "MultiSimilarityLoss", "pair", default_miner="multi-similarity",
             space={**_LR, "options.alpha": ("float", 0.5, 5.0, True),
                    "options.beta": ("float", 10.0, 80.0, True),
                    "miner_options.epsilon": ("float", 0.05, 0.3, False)},
             doc="multi-similarity loss + miner (Wang et al. 2019)"),
)  # fmt: skip
LOSSES.register(
    "supcon",
    LossSpec(_PML + "SupConLoss", "pair", {"temperature": "temperature"},
             space={**_LR, "temperature": ("float", 0.03, 0.5, True)},
             doc="supervised contrastive loss (Khosla et al. 2020)"),
)  # fmt: skip
LOSSES.register(
    "arcface",
    LossSpec(_PML + "ArcFaceLoss", "classifier", _MARGIN_SCALE,
             space={**_LR, **_LOSS_LR, "margin": ("float", 5.0, 40.0, False), **_SCALE},
             doc="additive angular margin (Deng et al. 2019); PML's margin is in degrees"),
)  # fmt: skip
LOSSES.register(
    "subcenter-arcface",
    LossSpec(_PML + "SubCenterArcFaceLoss", "classifier", _MARGIN_SCALE,
             space={**_LR, **_LOSS_LR, "margin": ("float", 5.0, 40.0, False), **_SCALE},
             doc="ArcFace with several centres per class (Deng et al. 2020)"),
)  # fmt: skip
LOSSES.register(
    "cosface",
    LossSpec(_PML + "CosFaceLoss", "classifier", _MARGIN_SCALE,
             space={**_LR, **_LOSS_LR, "margin": ("float", 0.05, 0.5, False), **_SCALE},
             doc="additive cosine margin (Wang et al. 2018)"),
)  # fmt: skip
LOSSES.register(
    "proxy-anchor",
    LossSpec(_PML + "ProxyAnchorLoss", "classifier", _MARGIN,
             space={**_LR, **_LOSS_LR, "margin": ("float", 0.0, 0.5, False),
                    "options.alpha": ("float", 4.0, 64.0, True)},
             doc="proxy anchor loss (Kim et al. 2020)"),
)  # fmt: skip
LOSSES.register(
    "adacos",
    LossSpec("medml.losses.adacos.AdaCosLoss", "classifier", accepts_miner=False,
             space={**_LR, **_LOSS_LR, "options.dynamic": ("categorical", [True, False])},
             doc="AdaCos, an adaptive-scale cosine softmax (Zhang et al. 2019); written here"),
)  # fmt: skip
LOSSES.register(
    "softmax",
    LossSpec("medml.losses.softmax.SoftmaxLoss", "classifier", accepts_miner=False,
             space={**_LR, **_LOSS_LR},
             doc="the baseline: a linear classifier and cross-entropy"),
)  # fmt: skip

_MINER = "pytorch_metric_learning.miners."
for _kind in ("semihard", "hard", "all", "easy"):
    MINERS.register(
        _kind,
        MinerSpec(_MINER + "TripletMarginMiner", {"type_of_triplets": _kind},
                  doc=f"{_kind} triplets within the margin"),
    )  # fmt: skip
MINERS.register(
    "batch-hard", MinerSpec(_MINER + "BatchHardMiner", doc="hardest pos/neg per anchor")
)
MINERS.register(
    "multi-similarity",
    MinerSpec(_MINER + "MultiSimilarityMiner", doc="pairs by the multi-similarity rule"),
)
MINERS.register("pair-margin", MinerSpec(_MINER + "PairMarginMiner", doc="pairs violating margins"))


def _accepted(cls: type) -> set[str]:
    return set(inspect.signature(cls.__init__).parameters) - {"self", "args", "kwargs"}


def _construct(cls: type, what: str, kwargs: dict[str, Any]) -> Any:
    """``cls(**kwargs)``, with an error that lists the accepted options when one is wrong."""
    accepted = _accepted(cls)
    unknown = sorted(set(kwargs) - accepted)
    if unknown and "kwargs" not in inspect.signature(cls.__init__).parameters:
        raise ValueError(
            f"{what} ({cls.__name__}) has no option {', '.join(unknown)}; "
            f"its options: {', '.join(sorted(accepted))}"
        )
    return cls(**kwargs)


def loss_kwargs(spec: LossSpec, cfg: Any) -> dict[str, Any]:
    """Constructor arguments from the config: shortcuts that are set, then ``options``."""
    kwargs = {
        arg: getattr(cfg, short)
        for short, arg in spec.shortcuts.items()
        if getattr(cfg, short) is not None
    }
    for short in ("margin", "scale", "temperature"):
        if getattr(cfg, short) is not None and short not in spec.shortcuts:
            raise ValueError(f"loss {cfg.name!r} has no {short}; set loss.options instead")
    return {**kwargs, **cfg.options}


def build_miner(cfg: Any, spec: LossSpec) -> Any:
    """The configured miner (``None``: the loss's default; ``"none"``: no miner)."""
    name = cfg.miner if cfg.miner is not None else spec.default_miner
    if name in (None, NO_MINER):
        return None
    if not spec.accepts_miner:
        raise ValueError(f"loss {cfg.name!r} takes no miner (set loss.miner: none)")
    mspec = MINERS[name]
    cls = import_object(mspec.target)
    kwargs = {**mspec.options, **cfg.miner_options}
    if "margin" in _accepted(cls) and "margin" not in kwargs and cfg.margin is not None:
        kwargs["margin"] = cfg.margin
    return _construct(cls, f"miner {name!r}", kwargs)


def build_loss_module(cfg: Any, n_classes: int, embedding_dim: int) -> tuple[Any, Any]:
    """``(loss, miner)`` for a :class:`medml.config.LossConfig`."""
    spec = LOSSES[cfg.name]
    cls = import_object(spec.target)
    kwargs = loss_kwargs(spec, cfg)
    if spec.kind == "classifier":
        kwargs = {"num_classes": n_classes, "embedding_size": embedding_dim, **kwargs}
    loss = _construct(cls, f"loss {cfg.name!r}", kwargs)
    return loss, build_miner(cfg, spec)

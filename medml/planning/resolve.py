"""Plans become defaults: what the config sets explicitly wins, the rest comes from the plans.

"Explicitly" is pydantic's ``model_fields_set``: the keys the YAML or ``--set`` gave (a key
set to its default value counts as set). Keys that depend on one another follow the user: an
explicit ``pixdim`` gets a spatial size planned for it, an explicit spatial size a batch size
planned for it, an explicit modality other than CT no planned window.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from medml.catalog import Catalog
from medml.config import PreprocessConfig, Settings, TrainConfig
from medml.planning.fingerprint import catalog_digest, catalog_exists
from medml.planning.rules import (
    Plans,
    batch_for,
    budget_bytes,
    fit_memory,
    median_size,
    n_labelled,
)
from medml.planning.store import read_plans
from medml.workspace import Workspace

log = logging.getLogger(__name__)


def planned_updates(settings: Settings, plans: Plans) -> dict[str, dict[str, Any]]:
    """``{"preprocess": {...}, "train": {...}}``: the keys the plans fill in ``settings``."""
    pre, explicit = settings.preprocess, settings.preprocess.model_fields_set
    planned = plans.preprocess_defaults()
    fills = {k: v for k, v in planned.items() if k not in explicit}
    modality = fills.get("modality", pre.modality)
    if modality != "CT":
        fills.pop("window", None)
    if modality != "mask" and "foreground_threshold" in fills:
        fills.pop("foreground_threshold")  # the plans' no-crop rule is for masks only
    fp, cfg = plans.fingerprint, settings.plan
    budget = budget_bytes(plans.memory_gb, cfg)
    if "pixdim" in explicit and "spatial_size" not in explicit:
        size, _ = fit_memory(median_size(fp, pre.pixdim), budget, cfg, n_labelled(fp))
        fills["spatial_size"] = size
    spatial = fills.get("spatial_size", pre.spatial_size)
    train: dict[str, Any] = {}
    if "batch_size" not in settings.train.model_fields_set:
        train["batch_size"] = (
            plans.batch_size
            if tuple(spatial) == tuple(plans.spatial_size)
            else batch_for(tuple(spatial), budget, cfg, n_labelled(fp))
        )
    return {"preprocess": fills, "train": train}


def _filled(model: Any, cls: type, fills: dict[str, Any]) -> Any:
    """``model`` with ``fills`` validated in, its explicit keys still marked as the only set."""
    validated = cls.model_validate({**model.model_dump(), **fills})
    return cls.model_construct(_fields_set=set(model.model_fields_set), **dict(validated))


def resolve(settings: Settings, ws: Workspace, plans: Plans | None = None) -> Settings:
    """``settings`` with preprocessing defaults and ``train.batch_size`` from the workspace's
    plans wherever the config left them unset; unchanged when there are no plans."""
    settings = respect_laterality(settings, ws)
    plans = plans or read_plans(ws)
    if plans is None:
        return settings
    _warn_if_stale(ws, plans)
    updates = planned_updates(settings, plans)
    if updates["preprocess"] or updates["train"]:
        log.info("from the plans: %s", updates)
    return settings.model_copy(
        update={
            "preprocess": _filled(settings.preprocess, PreprocessConfig, updates["preprocess"]),
            "train": _filled(settings.train, TrainConfig, updates["train"]),
        }
    )


def _warn_if_stale(ws: Workspace, plans: Plans) -> None:
    """Plans from another catalog still beat the defaults, but the user should re-plan."""
    if not catalog_exists(ws):
        return
    scans = Catalog(ws.catalog_url).list_scans(labelled=False)
    if scans and catalog_digest(scans) != plans.catalog_digest:
        log.warning(
            "the catalog changed since %s was planned (%s): run `medml plan` again",
            ws.root / "plans.json",
            plans.created,
        )


LATERAL = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def respect_laterality(settings: Settings, ws: Workspace) -> Settings:
    """No flips where a flip changes the answer: when class names are lateral (``kidney-left``
    / ``kidney-right``), training flips and test-time flips are switched off, whatever the
    config says (a flipped left kidney is a right one), with a warning. Without a catalog,
    or with no lateral class, the settings are unchanged."""
    aug, model = settings.augment, settings.model
    if not (aug.flip_lr or aug.flip_axes or model.tta_flips) or not catalog_exists(ws):
        return settings
    names = {s["label"] for s in Catalog(ws.catalog_url).list_scans()}
    lateral = sorted(n for n in names if n and LATERAL.search(str(n)))
    if not lateral:
        return settings
    log.warning("classes %s are lateral: flips switched off (they would swap them)", lateral)
    return settings.model_copy(
        update={
            "augment": aug.model_copy(update={"flip_lr": False, "flip_axes": []}),
            "model": model.model_copy(update={"tta_flips": []}),
        }
    )

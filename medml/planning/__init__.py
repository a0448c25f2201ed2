"""Planning apart from execution, as nnU-Net v2 does: fingerprint the catalog, derive plans
(target spacing, network input size, intensity step, batch size for the memory at hand), write
them to ``WS/plans.json``; ``resolve`` makes them the defaults of preprocessing and training.

Pure library (numpy, nibabel, scipy, the catalog): no torch, MLflow or Prefect. docs/planning.md
states the rules.
"""

from __future__ import annotations

from pathlib import Path

from medml.catalog import Catalog
from medml.config import PlanConfig
from medml.lock import workspace_lock
from medml.planning.fingerprint import (
    EMPTY_CATALOG,
    Fingerprint,
    PlanningError,
    catalog_exists,
    fingerprint,
)
from medml.planning.resolve import planned_updates, resolve
from medml.planning.rules import PLANS_VERSION, Plans, make_plans, memory_at_hand
from medml.planning.store import plans_path, read_plans, write_plans
from medml.workspace import Workspace

__all__ = [
    "EMPTY_CATALOG",
    "PLANS_VERSION",
    "Fingerprint",
    "PlanningError",
    "Plans",
    "fingerprint",
    "make_plans",
    "memory_at_hand",
    "plan_workspace",
    "planned_updates",
    "plans_path",
    "read_plans",
    "resolve",
    "write_plans",
]


def plan_workspace(
    ws: Workspace,
    cfg: PlanConfig | None = None,
    memory_gb: float | None = None,
    wait: bool = False,
) -> tuple[Plans, Path]:
    """Fingerprint the workspace's catalog, make the plans and write them; nothing is created
    when the workspace or its catalog does not exist. Runs under the workspace lock (``wait``:
    queue behind another writer instead of failing)."""
    if not ws.root.is_dir():
        raise PlanningError(f"workspace {ws.root} does not exist: {EMPTY_CATALOG}")
    if not catalog_exists(ws):
        raise PlanningError(EMPTY_CATALOG)
    cfg = cfg or PlanConfig()
    with workspace_lock(ws.root, "plan", wait, ws.catalog_url):  # after the checks above
        plans = make_plans(fingerprint(ws, Catalog(ws.catalog_url), cfg), memory_gb, cfg)
        return plans, write_plans(ws, plans)

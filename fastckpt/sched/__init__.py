"""fastckpt.sched: startup-time estimates that a scheduler embeds.

Plain data in, plain data out: describe servers (tiers with bandwidth and overhead, GPUs, which
tier holds which model, queued loads, running instances) and models (bytes, GPUs); get back a
startup-time estimate per server with its parts, a migration plan when GPUs must first be freed,
a ranking and a deterministic pick. Importing this package needs neither torch nor the compiled
core. Calibration (``fastckpt calibrate``) fits each tier's bandwidth and overhead through
fastckpt's own load path and keeps them in a machine profile; ``profile`` refines them online.
See docs/sched.md.
"""

from __future__ import annotations

from fastckpt.sched.estimate import (
    EXACT_PLAN_CELLS,
    Estimator,
    LoadEstimate,
    MigrationPlan,
    StartEstimate,
    load_estimates,
    plan_migration,
    prefer_room,
)
from fastckpt.sched.model import (
    Instance,
    ModelSpec,
    RecomputeModel,
    SchedError,
    Server,
    TierQueue,
    TierSpeed,
    make_server,
)
from fastckpt.sched.profile import (
    MachineProfile,
    Sample,
    TierFit,
    TierProfile,
    fit_tier,
    observations_to_converge,
)

__all__ = [
    "EXACT_PLAN_CELLS",
    "Estimator",
    "Instance",
    "LoadEstimate",
    "MachineProfile",
    "MigrationPlan",
    "ModelSpec",
    "RecomputeModel",
    "Sample",
    "SchedError",
    "Server",
    "StartEstimate",
    "TierFit",
    "TierProfile",
    "TierQueue",
    "TierSpeed",
    "fit_tier",
    "load_estimates",
    "make_server",
    "observations_to_converge",
    "plan_migration",
    "prefer_room",
]

"""What a serving replica knows about itself, as the routing stats it reports.

``HostState`` follows the models of one replica through their life: requested but waiting for
the replica's loader (``queued``), loading (from which tier, how many bytes), resident (in Ray
Serve's multiplexed cache), evicted by Ray Serve (its checkpoint usually still in the DRAM or SSD
tier). ``report()`` turns that, what the tiers hold (a ``TierView``) and the tier speeds into
the routing stats the start-time router ranks on: the ``fastckpt.sched.wire`` server shape plus
fields for people and logs.

Reporting is cheap and never blocks on a load: it reads counters under a lock and asks the tier
view, whose Loader view is in-memory bookkeeping (``Loader.cache_info()``); the SSD tier's
key -> model mapping is refreshed (a scan of its directory) only after this replica's own loads
and when the tier holds a copy not seen before (a conversion finished in the background). A copy
still being made is not an item of the tier, so a model is never reported on SSD before its
copy is complete.

Tiers, in load order: ``dram`` (the Loader's DRAM tier or the node's ``fastckpt serve``
daemon), ``ssd`` (the Loader's SSD tier: converted copies of slower sources), ``remote`` (the
catalog's path itself, which holds every model). Speeds come from a ``fastckpt.sched``
machine profile (``MachineProfile``: tiers ``dram``, ``ssd`` (else ``disk``), ``remote``),
refined online by each load this replica times; tiers the profile lacks get the simulator's
nominal speeds and the report says ``"calibrated": false``.

Imports neither torch nor Ray.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from fastckpt.integrations.ray_serve.catalog import Catalog
from fastckpt.sched.profile import MachineProfile, TierProfile

TIERS = ("dram", "ssd", "remote")
#: Threads of a replica running token steps (each step on one torch thread by default).
STEP_THREADS = 2
#: Where a profile's tier comes from when the tier itself is absent (``fastckpt calibrate``
#: measures ``dram`` and ``disk``: the SSD tier's converted copies are read like any local file).
PROFILE_FALLBACK = {"ssd": "disk"}


class TierView(Protocol):
    """What the tiers of one replica hold, by model name."""

    kind: str

    def held(self) -> dict[str, dict[str, int]]:
        """Tier (``dram``, ``ssd``) -> {model name: bytes} of catalog models it holds."""
        ...

    def refresh(self) -> None:
        """Re-read what cannot be tracked in memory (called after this replica's loads)."""
        ...


class NoTiers:
    """A replica without tiers (plain loading): holds nothing."""

    kind = "none"

    def held(self) -> dict[str, dict[str, int]]:
        return {}

    def refresh(self) -> None:
        return None


class LoaderTiers:
    """The DRAM and SSD tiers of a ``fastckpt.Loader``, read from ``Loader.cache_info()``.

    DRAM-tier items are keyed by the resolved checkpoint root, which is the catalog path or,
    for a source loaded from the SSD tier's converted copy, the copy ``<ssd dir>/<key>``;
    SSD-tier items by a key whose source path the tier records beside the copy (read by
    ``refresh``).
    """

    kind = "loader"

    def __init__(self, loader: Any, catalog: Catalog) -> None:
        from fastckpt.config import ssd_tier_dir

        self.loader = loader
        self.by_path = catalog.by_path()
        self.ssd_dir = (
            os.path.realpath(ssd_tier_dir(loader.config()))
            if getattr(loader, "ssd_tier", None)
            else ""
        )
        self.by_ssd_key: dict[str, str] = {}
        self._unmapped: set[str] = set()  # SSD-tier keys of no catalog model
        self.refresh()

    def refresh(self) -> None:
        if not self.ssd_dir:
            return
        from fastckpt.tiers.ssdfiles import scan

        found = {}
        for e in scan(self.ssd_dir):
            model = self.by_path.get(os.path.realpath(e.source)) if e.source else None
            if model is not None:
                found[e.key] = model
        self.by_ssd_key = found

    def _model_of_root(self, root: str) -> str | None:
        model = self.by_path.get(root)
        if model is None and self.ssd_dir and os.path.dirname(root) == self.ssd_dir:
            model = self.by_ssd_key.get(os.path.basename(root))
        return model

    def held(self) -> dict[str, dict[str, int]]:
        info = self.loader.cache_info()
        out: dict[str, dict[str, int]] = {"dram": {}, "ssd": {}}
        for item in (info.get("dram") or {}).get("keys", ()):
            key = item["key"]
            model = self._model_of_root(str(key[0])) if isinstance(key, list) and key else None
            if model is not None:
                out["dram"][model] = int(item["nbytes"])
        ssd_items = (info.get("ssd") or {}).get("keys", ())
        new = {str(i["key"]) for i in ssd_items} - set(self.by_ssd_key) - self._unmapped
        if new:  # published since the last refresh (a conversion ends after its load)
            self.refresh()
            self._unmapped |= new - set(self.by_ssd_key)
        for item in ssd_items:
            model = self.by_ssd_key.get(str(item["key"]))
            if model is not None:
                out["ssd"][model] = int(item["nbytes"])
        return out


class DaemonTiers:
    """The DRAM of the node's ``fastckpt serve`` daemon, from its listing (bounded wait)."""

    kind = "daemon"

    def __init__(self, socket_path: str, catalog: Catalog, timeout_s: float = 0.5) -> None:
        self.socket_path = socket_path
        self.by_path = catalog.by_path()
        self.timeout_s = timeout_s
        self.error = ""

    def refresh(self) -> None:
        return None

    def held(self) -> dict[str, dict[str, int]]:
        from fastckpt.serve.client import Client

        out: dict[str, dict[str, int]] = {"dram": {}}
        try:
            with Client(self.socket_path, timeout_s=self.timeout_s) as client:
                listing = client.ls()
        except (OSError, ValueError, RuntimeError) as exc:  # no daemon: nothing held
            self.error = f"{type(exc).__name__}: {exc}"
            return out
        self.error = ""
        for e in listing.get("entries", ()):
            if not e.get("ready"):
                continue
            path = os.path.realpath(os.path.join(str(e["root"]), str(e["name"])))
            model = self.by_path.get(path)
            if model is not None:
                out["dram"][model] = int(e["nbytes"])
        return out


def tier_speeds(
    profile: MachineProfile | None, nominal: Mapping[str, tuple[float, float]] | None = None
) -> tuple[dict[str, TierProfile], list[str]]:
    """A ``TierProfile`` per tier of ``TIERS`` from ``profile``, and the tiers that fell back to
    the nominal speeds (default: ``fastckpt.sched.sim.NOMINAL``)."""
    from fastckpt.sched.sim import NOMINAL

    speeds = NOMINAL if nominal is None else nominal
    have = dict(profile.tiers) if profile is not None else {}
    out: dict[str, TierProfile] = {}
    missing = []
    for tier in TIERS:
        found = have.get(tier) or have.get(PROFILE_FALLBACK.get(tier, ""))
        if found is None:
            bw, ovh = speeds[tier]
            found = TierProfile(tier, bw, ovh, bw)
            missing.append(tier)
        out[tier] = TierProfile(
            tier,
            found.bandwidth_bps,
            found.overhead_s,
            found.calibrated_bandwidth_bps,
            found.samples,
            found.observations,
            found.ignored_observations,
            found.updated,
        )
    return out, missing


@dataclass
class _Load:
    model: str
    tier: str
    nbytes: int
    started: float


def free_memory_bytes() -> int:
    """MemAvailable of this machine (0 where /proc/meminfo is not available)."""
    from fastckpt.rules.host import meminfo

    return int(meminfo().get("MemAvailable", 0))


class HostState:
    """The models of one replica and its routing stats (see the module docstring).

    Args:
        name: the replica's name (its Ray Serve replica id).
        catalog: the models it may serve.
        view: what its tiers hold.
        slots: models Ray Serve keeps resident at once (``max_num_models_per_replica``).
        profile: the machine profile with the tier speeds (None: nominal speeds).
        clock, wall, free_memory: seams for tests (monotonic seconds, epoch seconds, bytes).
    """

    def __init__(
        self,
        name: str,
        catalog: Catalog,
        view: TierView,
        slots: int,
        *,
        profile: MachineProfile | None = None,
        node: str = "",
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        free_memory: Callable[[], int] = free_memory_bytes,
    ) -> None:
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.name = name
        self.node = node
        self.catalog = catalog
        self.view = view
        self.slots = slots
        self.speeds, self.uncalibrated = tier_speeds(profile)
        self._clock = clock
        self._wall = wall
        self._free_memory = free_memory
        self._lock = threading.Lock()
        self.resident: OrderedDict[str, None] = OrderedDict()
        self.loading: dict[str, _Load] = {}
        self.queued: dict[str, float] = {}
        self.loads = dict.fromkeys(TIERS, 0)
        self.load_seconds = dict.fromkeys(TIERS, 0.0)
        self.failed_loads = 0
        self.load_seq = 0
        self.evictions = 0
        self.requests = 0
        self.waited = 0
        self.reports = 0

    # ------------------------------------------------------------------ transitions
    def request(self, model: str) -> bool:
        """A request for ``model`` arrived; returns whether it must wait for a start (the model
        is not resident), and marks the start queued if it is not loading yet."""
        self.catalog[model]  # unknown models are refused by the caller's first lookup
        with self._lock:
            self.requests += 1
            if model in self.resident:
                self.resident.move_to_end(model)
                return False
            self.waited += 1
            if model not in self.loading and model not in self.queued:
                self.queued[model] = self._clock()
            return True

    def tier_of(self, model: str, held: Mapping[str, Mapping[str, int]] | None = None) -> str:
        """The tier a start of ``model`` loads from now: the fastest tier holding it."""
        held = self.view.held() if held is None else held
        for tier in TIERS[:-1]:
            if model in held.get(tier, {}):
                return tier
        return "remote"

    def start(self, model: str) -> str:
        """The replica's loader begins loading ``model``; returns the tier it loads from."""
        tier = self.tier_of(model)
        with self._lock:
            self.queued.pop(model, None)
            self.loading[model] = _Load(model, tier, self.catalog[model].nbytes, self._clock())
        return tier

    def finish(self, model: str, ok: bool) -> tuple[float, int]:
        """The load of ``model`` ended; returns its seconds and its number on this replica. A
        successful load makes the model resident and refines the tier's speed from its time."""
        with self._lock:
            load = self.loading.pop(model)
            seconds = self._clock() - load.started
            self.load_seq += 1
            seq = self.load_seq
            if not ok:
                self.failed_loads += 1
                return seconds, seq
            self.resident[model] = None
            self.loads[load.tier] += 1
            self.load_seconds[load.tier] += seconds
            self.speeds[load.tier] = self.speeds[load.tier].observe(load.nbytes, seconds)
        self.view.refresh()
        return seconds, seq

    def abandon(self, model: str) -> None:
        """A queued start will not happen (its request failed before the load began)."""
        with self._lock:
            self.queued.pop(model, None)

    def evicted(self, model: str) -> None:
        """Ray Serve dropped ``model`` from the replica (its checkpoint may stay in a tier)."""
        with self._lock:
            if model in self.resident:
                del self.resident[model]
                self.evictions += 1

    # ------------------------------------------------------------------ report
    def report(self) -> dict[str, Any]:
        """The routing stats: ``fastckpt.sched.wire`` server state and details (module doc)."""
        held = self.view.held()
        now = self._clock()
        with self._lock:
            self.reports += 1
            queues: dict[str, dict[str, int]] = {}
            loading = []
            for ld in self.loading.values():
                speed = self.speeds[ld.tier]
                elapsed = now - ld.started
                moved = max(0.0, elapsed - speed.overhead_s) * speed.bandwidth_bps
                left = max(0, ld.nbytes - int(moved))
                q = queues.setdefault(ld.tier, {"loads": 0, "nbytes": 0})
                q["loads"] += 1
                q["nbytes"] += left
                loading.append(
                    {
                        "model": ld.model,
                        "tier": ld.tier,
                        "nbytes": ld.nbytes,
                        "nbytes_left": left,
                        "elapsed_s": elapsed,
                    }
                )
            queued = []
            for model in self.queued:
                tier = self.tier_of(model, held)
                nbytes = self.catalog[model].nbytes
                q = queues.setdefault(tier, {"loads": 0, "nbytes": 0})
                q["loads"] += 1
                q["nbytes"] += nbytes
                queued.append({"model": model, "tier": tier, "nbytes": nbytes})
            stats: dict[str, Any] = {
                # fastckpt.sched.wire: what the router's estimator reads
                # model slots; a start never lacks room (Ray Serve evicts its LRU model), but
                # nearly equal starts go where a slot is free (fastckpt.sched.prefer_room)
                "gpus": self.slots,
                "free_gpus": max(0, self.slots - len(self._in_slots())),
                "serial": True,  # the multiplexed cache loads one model at a time
                "tiers": [
                    {"name": t, "bandwidth_bps": s.bandwidth_bps, "overhead_s": s.overhead_s}
                    for t, s in self.speeds.items()
                ],
                "holds": {t: sorted(held.get(t, {})) for t in TIERS[:-1] if held.get(t)},
                "everywhere": ["remote"],
                "queues": queues,
                # details
                "replica": self.name,
                "node": self.node,
                "at": self._wall(),
                "resident": list(self.resident),
                "loading": loading,
                "queued": queued,
                "held_bytes": {t: sum(v.values()) for t, v in held.items()},
                "free_memory_bytes": self._free_memory(),
                "tier_source": self.view.kind,
                "calibrated": not self.uncalibrated,
                "uncalibrated_tiers": list(self.uncalibrated),
                "loads": dict(self.loads),
                "load_seconds": dict(self.load_seconds),
                "failed_loads": self.failed_loads,
                "evictions": self.evictions,
                "requests": self.requests,
                "waited": self.waited,
            }
        return stats

    def _in_slots(self) -> set[str]:
        """Models resident, loading or queued: what occupies Ray Serve's slots (the caller
        holds the lock)."""
        return set(self.resident) | set(self.loading) | set(self.queued)

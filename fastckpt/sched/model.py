"""Plain data the estimator works on: tiers, models, servers, running instances, recompute costs.

Everything here is a frozen dataclass of numbers and strings, validated on construction, so a
scheduler node needs neither torch nor fastckpt's compiled extension. Units are in the names:
``*_s`` seconds, ``*_bytes`` bytes, ``bandwidth_bps`` bytes per second.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fastckpt.errors import FastckptError


class SchedError(FastckptError, ValueError):
    """A scheduling input is invalid (a negative size, an unknown tier, a malformed profile)."""


def _check_nonneg(what: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
        raise SchedError(f"{what} must be a number, got {value!r}")
    if value < 0 or math.isinf(value):
        raise SchedError(f"{what} must be finite and >= 0, got {value!r}")


def _check_name(what: str, value: object) -> None:
    if not isinstance(value, str) or not value:
        raise SchedError(f"{what} must be a non-empty string, got {value!r}")


@dataclass(frozen=True)
class TierSpeed:
    """How fast one storage tier of one server delivers a checkpoint to the GPUs (or CPU).

    A load of ``n`` bytes from this tier takes ``overhead_s + n / bandwidth_bps``.
    """

    name: str
    bandwidth_bps: float
    overhead_s: float = 0.0

    def __post_init__(self) -> None:
        _check_name("tier name", self.name)
        _check_nonneg(f"tier {self.name!r} bandwidth_bps", self.bandwidth_bps)
        if self.bandwidth_bps <= 0:
            raise SchedError(f"tier {self.name!r} bandwidth_bps must be > 0")
        _check_nonneg(f"tier {self.name!r} overhead_s", self.overhead_s)

    def load_s(self, nbytes: int) -> float:
        return self.overhead_s + nbytes / self.bandwidth_bps


@dataclass(frozen=True)
class TierQueue:
    """Loads already waiting for one tier of one server, ahead of a new one."""

    loads: int = 0
    nbytes: int = 0

    def __post_init__(self) -> None:
        _check_nonneg("queued loads", self.loads)
        _check_nonneg("queued bytes", self.nbytes)
        if self.nbytes > 0 and self.loads == 0:
            raise SchedError("a tier queue with bytes must count at least one load")


@dataclass(frozen=True)
class ModelSpec:
    """A model to start: its checkpoint size and the GPUs one instance needs."""

    name: str
    nbytes: int
    gpus: int = 1

    def __post_init__(self) -> None:
        _check_name("model name", self.name)
        _check_nonneg(f"model {self.name!r} nbytes", self.nbytes)
        if not isinstance(self.gpus, int) or isinstance(self.gpus, bool) or self.gpus < 0:
            raise SchedError(f"model {self.name!r} gpus must be an int >= 0, got {self.gpus!r}")


@dataclass(frozen=True)
class Instance:
    """A running instance that could be migrated away to free its GPUs."""

    id: str
    model: str
    gpus: int
    tokens: int = 0

    def __post_init__(self) -> None:
        _check_name("instance id", self.id)
        _check_name(f"instance {self.id!r} model", self.model)
        if not isinstance(self.gpus, int) or isinstance(self.gpus, bool) or self.gpus < 0:
            raise SchedError(f"instance {self.id!r} gpus must be an int >= 0, got {self.gpus!r}")
        if not isinstance(self.tokens, int) or isinstance(self.tokens, bool) or self.tokens < 0:
            raise SchedError(f"instance {self.id!r} tokens must be an int >= 0")


_COEFF_ALIASES: dict[str, tuple[str, ...]] = {
    # the last name of each is what fastckpt.migrate's RecomputeCostModel.to_dict() writes
    "a": ("a", "a_s", "intercept_s", "fixed_s", "const_s", "c0_s"),
    "b": ("b", "b_s", "per_token_s", "linear_s", "c1_s_per_token"),
    "c": ("c", "c_s", "per_token2_s", "per_token_sq_s", "quadratic_s", "c2_s_per_token2"),
}


@dataclass(frozen=True)
class RecomputeModel:
    """Migration cost of one instance: ``a + b * tokens + c * tokens**2`` seconds.

    The coefficients come from fastckpt.migrate's recompute model (exported as plain data);
    ``from_dict`` accepts its dict/JSON shape without importing that package.
    """

    a: float = 0.0
    b: float = 0.0
    c: float = 0.0

    def __post_init__(self) -> None:
        for k in ("a", "b", "c"):
            _check_nonneg(f"recompute coefficient {k}", getattr(self, k))

    def cost_s(self, tokens: int) -> float:
        return self.a + self.b * tokens + self.c * tokens * tokens

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RecomputeModel:
        """Read ``{"a": s, "b": s/token, "c": s/token^2}``.

        Also accepted: ``{"coefficients": [a, b, c]}`` (or a nested ``"recompute"`` mapping),
        the spelled-out keys ``intercept_s``, ``per_token_s``, ``per_token2_s``, and the export
        of ``fastckpt.migrate`` (``c0_s``, ``c1_s_per_token``, ``c2_s_per_token2``). Unknown extra
        keys (units, fit quality, provenance) are ignored; a missing coefficient is 0.
        """
        if not isinstance(data, Mapping):
            raise SchedError(f"recompute model must be a mapping, got {type(data).__name__}")
        if "recompute" in data and isinstance(data["recompute"], Mapping):
            return cls.from_dict(data["recompute"])
        if "coefficients" in data:
            coeffs = data["coefficients"]
            if isinstance(coeffs, Mapping):
                return cls.from_dict(coeffs)
            if not isinstance(coeffs, (list, tuple)) or not 1 <= len(coeffs) <= 3:
                raise SchedError("recompute 'coefficients' must be a list [a, b, c]")
            vals = [float(v) for v in coeffs] + [0.0] * (3 - len(coeffs))
            return cls(*vals)
        found: dict[str, float] = {}
        for key, aliases in _COEFF_ALIASES.items():
            hits = [alias for alias in aliases if alias in data]
            if len(hits) > 1:
                raise SchedError(f"recompute model gives coefficient {key} twice: {hits}")
            if hits:
                try:
                    found[key] = float(data[hits[0]])
                except (TypeError, ValueError):
                    raise SchedError(
                        f"recompute coefficient {hits[0]!r} is not a number: {data[hits[0]]!r}"
                    ) from None
        if not found:
            raise SchedError(
                f"recompute model has none of the coefficients a, b, c (keys: {sorted(data)})"
            )
        return cls(**found)

    def as_dict(self) -> dict[str, float]:
        return {"a": self.a, "b": self.b, "c": self.c}


@dataclass(frozen=True)
class Server:
    """One server as the estimator sees it.

    Attributes:
        name: unique name (ties between equally fast servers are broken by it).
        tiers: speed of each tier (e.g. ``gpu``, ``dram``, ``ssd``, ``remote``).
        gpus: GPUs in total.
        free_gpus: GPUs not used by a running instance.
        holds: tier name -> models whose checkpoint that tier holds. A tier listed in ``tiers``
            but absent here holds nothing, except tiers named in ``everywhere`` (e.g. remote
            storage that holds every model).
        queues: tier name -> loads already waiting for that tier.
        running: instances that could be migrated away.
        everywhere: tiers that hold every model.
    """

    name: str
    tiers: tuple[TierSpeed, ...]
    gpus: int
    free_gpus: int
    holds: Mapping[str, frozenset[str]] = field(default_factory=dict)
    queues: Mapping[str, TierQueue] = field(default_factory=dict)
    running: tuple[Instance, ...] = ()
    everywhere: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        _check_name("server name", self.name)
        names = [t.name for t in self.tiers]
        if len(set(names)) != len(names):
            raise SchedError(f"server {self.name!r} lists a tier twice: {names}")
        known = set(names)
        for where, keys in (
            ("holds", self.holds),
            ("queues", self.queues),
            ("everywhere", self.everywhere),
        ):
            unknown = sorted(set(keys) - known)
            if unknown:
                raise SchedError(f"server {self.name!r} {where} names unknown tiers {unknown}")
        if not isinstance(self.gpus, int) or self.gpus < 0:
            raise SchedError(f"server {self.name!r} gpus must be an int >= 0")
        if not isinstance(self.free_gpus, int) or not 0 <= self.free_gpus <= self.gpus:
            raise SchedError(
                f"server {self.name!r} free_gpus={self.free_gpus!r} must be between 0 and "
                f"gpus={self.gpus}"
            )
        used = sum(i.gpus for i in self.running)
        if used > self.gpus - self.free_gpus:
            raise SchedError(
                f"server {self.name!r}: running instances use {used} GPUs but only "
                f"{self.gpus - self.free_gpus} are in use"
            )
        ids = [i.id for i in self.running]
        if len(set(ids)) != len(ids):
            raise SchedError(f"server {self.name!r} lists a running instance twice")

    def tier(self, name: str) -> TierSpeed:
        for t in self.tiers:
            if t.name == name:
                return t
        raise SchedError(f"server {self.name!r} has no tier {name!r}")

    def tiers_holding(self, model: str) -> list[TierSpeed]:
        return [
            t
            for t in self.tiers
            if t.name in self.everywhere or model in self.holds.get(t.name, ())
        ]

    def queue(self, tier: str) -> TierQueue:
        return self.queues.get(tier, TierQueue())


def make_server(
    name: str,
    tiers: Iterable[TierSpeed],
    *,
    gpus: int,
    free_gpus: int | None = None,
    holds: Mapping[str, Iterable[str]] | None = None,
    queues: Mapping[str, TierQueue] | None = None,
    running: Iterable[Instance] = (),
    everywhere: Iterable[str] = (),
) -> Server:
    """Build a ``Server`` from ordinary lists and dicts (free GPUs default to what is unused)."""
    run = tuple(running)
    if free_gpus is None:
        free_gpus = gpus - sum(i.gpus for i in run)
    return Server(
        name=name,
        tiers=tuple(tiers),
        gpus=gpus,
        free_gpus=free_gpus,
        holds={k: frozenset(v) for k, v in (holds or {}).items()},
        queues=dict(queues or {}),
        running=run,
        everywhere=frozenset(everywhere),
    )

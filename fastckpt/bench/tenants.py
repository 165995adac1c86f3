"""The other tenants of a shared machine, as Linux's scheduler counts them while a phase runs
(``BackgroundSampler``): the serverless benchmark records them so that the simulator shares the
machine's cores as the real run did."""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable, Sequence


class BackgroundSampler:
    """The load of other tenants of this machine while a phase runs, as the scheduler sees it.

    Linux's fair scheduler shares the CPUs between scheduling groups first: with autogroup on
    (``/proc/sys/kernel/sched_autogroup_enabled``, the default of most kernels) every session
    is one group, whatever its number of threads; without it every thread is. Every
    ``interval_s`` this counts the groups with a runnable thread, leaving out the sessions
    ``exclude()`` returns (the local cluster's nodes, whose work the simulator models) and this
    sampler's own thread. Use as a context manager; ``mean()`` averages the samples (0 where
    ``/proc`` is not readable)."""

    def __init__(self, exclude: Callable[[], Sequence[int]] = tuple, interval_s: float = 0.5):
        import threading

        self._exclude = exclude
        self.interval_s = interval_s
        self.samples: list[float] = []
        self.by_session = _autogroups()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="background-sampler", daemon=True)
        self._tid = 0

    def __enter__(self) -> BackgroundSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def mean(self) -> float:
        return statistics.fmean(self.samples) if self.samples else 0.0

    def sample(self) -> float:
        """Groups (or threads) with runnable threads now, other than the excluded ones."""
        skip = set(self._exclude())
        groups: set[int] = set()
        threads = 0
        try:
            pids = [p for p in os.listdir("/proc") if p.isdigit()]
        except OSError:
            return 0.0
        for pid in pids:
            try:
                tids = os.listdir(f"/proc/{pid}/task")
            except OSError:
                continue
            for tid in tids:
                if int(tid) == self._tid:
                    continue
                stat = _stat_fields(f"/proc/{pid}/task/{tid}/stat")
                if not stat or stat[0] != "R" or int(stat[3]) in skip:  # state, ..., session
                    continue
                groups.add(int(stat[3]))
                threads += 1
        return float(len(groups) if self.by_session else threads)

    def _run(self) -> None:
        self._tid = threading_native_id()
        while not self._stop.wait(self.interval_s):
            self.samples.append(self.sample())


def threading_native_id() -> int:
    import threading

    return int(threading.get_native_id())


def _autogroups() -> bool:
    try:
        with open("/proc/sys/kernel/sched_autogroup_enabled", encoding="ascii") as fh:
            return fh.read().strip() == "1"
    except OSError:
        return False


def _stat_fields(path: str) -> list[str] | None:
    """The fields of a /proc stat file after the command name (state first), or None."""
    try:
        with open(path, encoding="ascii", errors="replace") as fh:
            text = fh.read()
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()

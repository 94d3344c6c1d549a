"""When a pair of replicas merges into a pipeline and when it splits again. Pure Python.

`ElasticCoordinator` sees each replica's KV load every `check_interval_s` and answers "merge",
"split" or nothing. It runs in the head's process, or as a Ray actor next to the deployment
(`start_coordinator`), where it also keeps the log of every transition for operators.

- Merge when every replica's KV usage is >= `merge_kv_usage` and the work waiting on each exceeds
  what it has free: a burst that more memory would serve sooner.
- Split when the merged pair's usage, counted against what the two replicas would hold apart, is
  below `split_kv_usage` and not rising (no higher than at any of the last `falling_checks`
  observations), and nothing waits.
- `min_merged_s` / `min_split_s` hold each state at least that long, so a load at the threshold
  does not flap (every transition recomputes the requests in flight).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ElasticConfig:
    """Thresholds of the merge/split policy (one place for every elastic knob)."""

    merge_kv_usage: float = 0.95
    split_kv_usage: float = 0.5
    falling_checks: int = 3
    check_interval_s: float = 0.5
    min_merged_s: float = 5.0
    min_split_s: float = 5.0
    enabled: bool = True  # False: observe only, never transition (the baseline of the benchmark)

    def __post_init__(self) -> None:
        if not 0.0 < self.split_kv_usage < self.merge_kv_usage <= 1.0:
            raise ValueError(f"need 0 < split_kv_usage ({self.split_kv_usage}) < merge_kv_usage "
                             f"({self.merge_kv_usage}) <= 1")
        if self.falling_checks < 1 or self.check_interval_s < 0 or self.min_merged_s < 0 or self.min_split_s < 0:
            raise ValueError(f"falling_checks must be >= 1 and the intervals >= 0: {self}")


@dataclass(frozen=True)
class ReplicaLoad:
    """One replica's (or the merged pair's) KV books, in its own page groups."""

    capacity_groups: int
    used_groups: int  # held by running requests (idle kept pages are reclaimable: not counted)
    waiting_groups: int  # needed by requests queued for their first token

    @property
    def usage(self) -> float:
        return self.used_groups / self.capacity_groups if self.capacity_groups else 1.0

    @property
    def free_groups(self) -> int:
        return max(0, self.capacity_groups - self.used_groups)


@dataclass(frozen=True)
class Decision:
    action: str  # "merge" | "split"
    reason: str


class ElasticCoordinator:
    """The merge/split policy and the log of transitions."""

    def __init__(self, config: ElasticConfig | None = None) -> None:
        self.config = config or ElasticConfig()
        self._since = -float("inf")  # when the pair last changed state
        self._recent: deque[float] = deque(maxlen=self.config.falling_checks)
        self._events: list[dict] = []

    def observe(self, loads: list[ReplicaLoad], merged: bool, now: float | None = None) -> Decision | None:
        """The action to take now, given each replica's load (one load while merged)."""
        cfg = self.config
        now = time.monotonic() if now is None else now
        if not merged:
            self._recent.clear()
            if not cfg.enabled or now - self._since < cfg.min_split_s:
                return None
            if all(l.usage >= cfg.merge_kv_usage and l.waiting_groups > l.free_groups for l in loads):
                usage = ", ".join(f"{l.usage:.0%}" for l in loads)
                waiting = ", ".join(f"{l.waiting_groups}>{l.free_groups}" for l in loads)
                return Decision("merge", f"KV usage {usage} >= {cfg.merge_kv_usage:.0%} and waiting "
                                         f"groups exceed free ones ({waiting})")
            return None
        (load,) = loads
        # Not rising: no higher than at any recent check (a flat or idle load may split too).
        falling = len(self._recent) == self._recent.maxlen and all(load.usage <= u for u in self._recent)
        self._recent.append(load.usage)
        if not cfg.enabled or now - self._since < cfg.min_merged_s:
            return None
        if load.usage < cfg.split_kv_usage and falling and load.waiting_groups == 0:
            return Decision("split", f"merged KV usage {load.usage:.0%} < {cfg.split_kv_usage:.0%} and "
                                     f"not rising over {cfg.falling_checks} checks, nothing waiting")
        return None

    def configure(self, config: ElasticConfig) -> None:
        """New thresholds from now on (the transition log stays)."""
        self.config = config
        self._recent = deque(maxlen=config.falling_checks)

    def record(self, event: dict) -> None:
        """A transition happened (the pair reports what it did and how long it took)."""
        self._since = event.get("monotonic", time.monotonic())
        self._recent.clear()
        self._events.append(dict(event))

    def events(self) -> list[dict]:
        return list(self._events)

    def config_dict(self) -> dict:
        return asdict(self.config)


class RemoteCoordinator:
    """The same three calls on an `ElasticCoordinator` running as a Ray actor."""

    def __init__(self, handle) -> None:
        self.handle = handle

    def observe(self, loads: list[ReplicaLoad], merged: bool, now: float | None = None) -> Decision | None:
        import ray

        return ray.get(self.handle.observe.remote(loads, merged, now))

    def configure(self, config: ElasticConfig) -> None:
        import ray

        ray.get(self.handle.configure.remote(config))

    def record(self, event: dict) -> None:
        import ray

        ray.get(self.handle.record.remote(event))

    def events(self) -> list[dict]:
        import ray

        return ray.get(self.handle.events.remote())


def start_coordinator(config: ElasticConfig | None = None, name: str | None = None) -> RemoteCoordinator:
    """An `ElasticCoordinator` as a Ray actor (named `name` when given, so a deployment can find it)."""
    import ray

    opts = {"num_cpus": 0}
    if name is not None:
        opts.update(name=name, get_if_exists=True)
    return RemoteCoordinator(ray.remote(ElasticCoordinator).options(**opts).remote(config))

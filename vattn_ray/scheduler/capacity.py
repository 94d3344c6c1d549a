"""The KV capacity the head scheduler plans with, after failures. Pure Python.

A shard that cannot map a page group (`KVFailure`) makes the scheduler plan with fewer groups than
the shards announced. A failure may be transient (a mapping call that failed once) or permanent (a
shard that really holds less), and one failure cannot tell which. So a lowered estimate is only
kept for a while: after `wait` schedule calls without a failure the announced (nominal) capacity
is tried again. A failure during that trial doubles the wait; after `MAX_FAILED_PROBES` trials in
a row have failed, the shards are taken to hold what the estimate says and the nominal capacity
drops to it (requests that can then never fit are aborted by the scheduler). A trial that lasts
`wait` calls without a failure resets everything.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

BASE_WAIT = 32  # schedule calls before a lowered estimate is raised again
MAX_FAILED_PROBES = 3


class CapacityProbe:
    """When to raise a lowered capacity estimate back to the nominal one."""

    def __init__(self, nominal: int) -> None:
        self.nominal = nominal
        self.wait = BASE_WAIT
        self.since = 0  # schedule calls since the last failure or restore
        self.probing = False  # the nominal capacity is being tried after a failure
        self.lowered = nominal  # the estimate in force before the trial
        self.failed_probes = 0

    def reset(self, nominal: int) -> None:
        """The shards announced a new pool size (`Scheduler.set_capacity`)."""
        self.__init__(nominal)

    def failed(self, estimate: int) -> int:
        """A KV op failed and the books suggest `estimate` groups; returns the estimate to plan with."""
        self.since = 0
        if self.probing:  # the trial failed: back to what held before it, not a new descent
            estimate = min(estimate, self.lowered)
            self.probing = False
            self.failed_probes += 1
            self.wait *= 2
            if self.failed_probes >= MAX_FAILED_PROBES and estimate < self.nominal:
                logger.error("KV capacity: %d trials of %d page groups failed; planning with %d for good",
                             self.failed_probes, self.nominal, estimate)
                self.nominal = estimate
        return estimate

    def tick(self, current: int) -> int | None:
        """Called once per schedule(): the capacity to plan with from now on, or None to keep `current`."""
        self.since += 1
        if self.since < self.wait:
            return None
        self.since = 0
        if current < self.nominal:
            self.probing, self.lowered = True, current
            logger.info("KV capacity estimate %d -> %d page groups (trying the announced size again)",
                        current, self.nominal)
            return self.nominal
        if self.probing:  # the trial held: the failure was transient
            self.probing, self.failed_probes, self.wait = False, 0, BASE_WAIT
        return None

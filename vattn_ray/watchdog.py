"""The step watchdog: an engine that has work but finishes no step is stuck, and must say so.

A hung device, a deadlocked collective or a worker that never answers leaves the step loop
waiting forever, while every health check would still pass (the loop thread is alive). The
watchdog compares the time of the last finished step with how long the engine has had work; past
`timeout_s` the engine is unhealthy, so Ray Serve replaces the replica, and the requests in flight
are failed with a clear error instead of hanging. An idle engine is never stuck: the clock starts
when work is first seen after idling (at most one poll late, which only delays the verdict).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class StepWatchdog:
    """Decides from (has work, last step end) whether the engine is stuck; can poll on a thread."""

    def __init__(self, timeout_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout_s = float(timeout_s)
        self.clock = clock
        self._busy_since: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def stalled(self, has_work: bool, last_step_end: float) -> str | None:
        """A message saying why the engine is stuck, or None while it is idle or making progress."""
        now = self.clock()
        if not has_work:
            self._busy_since = None
            return None
        if self._busy_since is None:
            self._busy_since = now
        waited = now - max(last_step_end, self._busy_since)
        if waited <= self.timeout_s:
            return None
        return (f"the engine is stuck: no step finished in {waited:.0f} s while requests were in flight "
                f"(step_timeout_s={self.timeout_s:g})")

    def watch(self, check: Callable[[], bool], name: str = "vattn-engine-watchdog") -> None:
        """Call `check()` a few times per timeout on a daemon thread until it returns False or `stop()`."""
        interval = min(1.0, self.timeout_s / 4)

        def run() -> None:
            while not self._stop.wait(interval) and check():
                pass

        self._thread = threading.Thread(target=run, name=name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

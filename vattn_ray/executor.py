"""The executor seam: how the head reaches its workers (in-process for TP=1, Ray actors for TP>1).

Every executor offers the same few calls; the engine never knows which one it drives.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, Protocol

from vattn_ray.config import EngineConfig
from vattn_ray.scheduler.plan import StepOutput, StepPlan


class WorkerFailed(RuntimeError):
    """A worker died or raised; in-flight requests cannot continue on this group."""


class StepHandle(Protocol):
    """A step handed to the workers; `result()` waits for its output."""

    def result(self) -> StepOutput: ...


class _Done:
    """A step that already completed."""

    __slots__ = ("output",)

    def __init__(self, output: StepOutput) -> None:
        self.output = output

    def result(self) -> StepOutput:
        return self.output


class Executor(ABC):
    """Drives one tensor-parallel worker group."""

    # Whether `submit` returns before the step's device work is done, so that the head can plan
    # the next step meanwhile (then the engine plans one step ahead).
    overlaps_steps = False

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        # Set once a worker has failed: the group's shards may be mid-collective or gone, so no
        # further call may reach them; every later call raises WorkerFailed with this text.
        self.failure: str | None = None

    def check_alive(self) -> None:
        """Raise `WorkerFailed` if a worker of this group has failed before."""
        if self.failure is not None:
            raise WorkerFailed(f"{self.failure} (the worker group is unusable; start a new engine)")

    @abstractmethod
    def start(self) -> list:
        """Start every worker, load weights and KV pools; return each rank's `WorkerInfo`."""

    @abstractmethod
    def execute(self, plan: StepPlan) -> StepOutput:
        """Run one step on all ranks; rank 0's output with every rank's KV failures merged."""

    def submit(self, plan: StepPlan) -> StepHandle:
        """Hand `plan` to all ranks; steps run in submission order. Default: run it to the end."""
        return _Done(self.execute(plan))

    @abstractmethod
    def check_integrity(self, expected: dict[int, int]) -> None:
        """Every shard's KV manager matches the scheduler's view of the slots."""

    @abstractmethod
    def kv_stats(self, live_tokens: dict[int, int] | None = None):
        """Rank 0's KV statistics."""

    @abstractmethod
    def run_on_workers(self, fn: Callable[..., Any], *args: Any) -> list:
        """`fn(worker, *args)` on every rank between steps; each rank's result, rank order.

        For tests and benchmarks that need to look inside the shards (per-rank stats, timings);
        `fn` must be picklable (a module-level function) to reach Ray actors.
        """

    @abstractmethod
    def shutdown(self) -> None: ...


class InProcessExecutor(Executor):
    """TP=1: the worker lives in this process; a step is a plain method call."""

    overlaps_steps = True

    def start(self) -> list:
        from workers.worker import Worker

        self.worker = Worker(self.config)
        self.worker.init_device()
        return [self.worker.load()]

    def execute(self, plan: StepPlan) -> StepOutput:
        return self.worker.execute(plan)

    def submit(self, plan: StepPlan) -> StepHandle:
        return self.worker.submit(plan)

    def check_integrity(self, expected: dict[int, int]) -> None:
        self.worker.check_integrity(expected)

    def kv_stats(self, live_tokens: dict[int, int] | None = None):
        return self.worker.kv_stats(live_tokens)

    def run_on_workers(self, fn: Callable[..., Any], *args: Any) -> list:
        return [fn(self.worker, *args)]

    def shutdown(self) -> None:
        worker = getattr(self, "worker", None)
        if worker is not None:
            worker.shutdown()
            self.worker = None


def make_executor(config: EngineConfig, placement_group=None) -> Executor:
    """TP=1 runs in-process; TP>1 runs one Ray actor per rank (in `placement_group` if given)."""
    if config.parallel.tensor_parallel_size == 1:
        return InProcessExecutor(config)
    from vattn_ray.ray_executor import RayExecutor

    return RayExecutor(config, placement_group=placement_group)

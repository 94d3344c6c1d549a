"""`PipelineExecutor`: two replicas' worker groups driven as one two-stage pipeline.

The merged pair's head (an ordinary `LLMEngine` with this executor) plans for both stages at once:
the same KV ops go to every rank of both stages (the stages have the same KV layout, each for its
half of the layers), and the batch runs on stage 0 then stage 1, which talk directly to each other
(`vattn_ray/elastic/stage.py`). Both stages are called at once, from two threads, because stage 1
waits for stage 0's hidden states inside its call.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from vattn_ray.config import EngineConfig
from vattn_ray.elastic import stage as stage_fns
from vattn_ray.executor import Executor
from vattn_ray.scheduler.plan import StepOutput, StepPlan


class PipelineExecutor(Executor):
    """Stage 0 runs on `stages[0]`'s ranks, stage 1 on `stages[1]`'s; plans run one at a time."""

    overlaps_steps = False  # stage 0 embeds tokens that stage 1 samples: no planning ahead

    def __init__(self, config: EngineConfig, stages: list[Executor], infos: list) -> None:
        super().__init__(config)
        self.stages = stages
        self.infos = infos
        self._threads = ThreadPoolExecutor(len(stages), thread_name_prefix="pipeline-stage")

    def start(self) -> list:
        return list(self.infos)  # the stages were set up by the pair (`ElasticPair.merge`)

    def _on_stages(self, fn: Callable[..., Any], *args: Any) -> list[list]:
        for s in self.stages:
            s.check_alive()
        futures = [self._threads.submit(s.run_on_workers, fn, *args) for s in self.stages]
        return [f.result() for f in futures]

    def execute(self, plan: StepPlan) -> StepOutput:
        outs = [o for per_stage in self._on_stages(stage_fns.run_stage, plan) for o in per_stage]
        last = self._on_last_rank0(outs)
        failures = tuple(f for o in outs for f in o.kv_failures)
        executed = all(o.executed for o in outs)
        return StepOutput(plan.step, last.sampled if executed else (), failures, executed)

    def _on_last_rank0(self, outs: list[StepOutput]) -> StepOutput:
        # Stage 1's rank 0 samples; its outputs follow all of stage 0's ranks.
        return outs[len(self.infos) // 2]

    def check_integrity(self, expected: dict[int, int]) -> None:
        self._on_stages(stage_fns.check, expected)

    def kv_stats(self, live_tokens: dict[int, int] | None = None):
        from workers.worker import Worker

        return self.stages[0].run_on_workers(Worker.kv_stats, live_tokens)[0]

    def run_on_workers(self, fn: Callable[..., Any], *args: Any) -> list:
        return [r for per_stage in self._on_stages(fn, *args) for r in per_stage]

    def shutdown(self) -> None:
        """The stages belong to their replicas; only the threads end here."""
        self._threads.shutdown(wait=True)

"""Head scheduler: continuous batching, KV slot and page-group accounting, preemption.

Pure Python (no torch). `Scheduler.schedule()` emits a `StepPlan`; `Scheduler.update()` takes the
`StepOutput`. Those plan types (in `plan.py`) are the only things that cross to the workers.
"""

from vattn_ray.scheduler.plan import (KVFailure, KVOp, NewRequest, SampledToken, SeqChunk, StepOutput,
                                      StepPlan)
from vattn_ray.scheduler.request import QueueFull, RequestRejected, RequestUpdate
from vattn_ray.scheduler.scheduler import Scheduler, SchedulerStats

__all__ = ["Scheduler", "SchedulerStats", "RequestRejected", "QueueFull", "RequestUpdate", "StepPlan", "StepOutput",
           "KVOp", "SeqChunk", "NewRequest", "SampledToken", "KVFailure"]

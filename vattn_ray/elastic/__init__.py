"""Elastic memory under bursts: two replicas lend weight memory to their KV caches by merging into
a two-stage pipeline, and take it back when the burst is over (parameter-centric, as in KunServe).

- `pages.py`: every physical page of a device and who holds it (KV cache or a decoder layer).
- `weights.py`: decoder layers on those pages, dropped and restored without touching the model.
- `stage.py`: the worker side (enable, pair link, merge, pipeline step, split with restore, checks).
- `pipeline.py`: the executor that drives two replicas' workers as one pipeline.
- `policy.py`: when to merge and split (`ElasticConfig`, `ElasticCoordinator`, its Ray actor).
- `pair.py`: `ElasticPair`, the head of two replicas: routing, transitions, request migration.
"""

from vattn_ray.elastic.pair import ElasticPair, PairRequest
from vattn_ray.elastic.policy import (Decision, ElasticConfig, ElasticCoordinator, ReplicaLoad,
                                      start_coordinator)

__all__ = ["Decision", "ElasticConfig", "ElasticCoordinator", "ElasticPair", "PairRequest", "ReplicaLoad",
           "start_coordinator"]

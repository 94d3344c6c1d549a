"""An elastic pair in each Serve replica (docs/elastic.md, "Serving").

With an ``elastic:`` block in the app's args, each replica hosts one `ElasticPair`: two TP groups
(Ray actors on their own GPUs, bundles [0, TP) and [TP, 2 TP) of the replica's placement group; on
CPU at TP=1 both inside the replica) and one head, the replica itself. A merged pipeline needs one
head that drives both groups step by step, and a Serve replica can neither address nor drive
another replica's workers; so the pair lives in one replica and Serve scales in pairs.

The pair's `ElasticCoordinator` runs as a Ray actor named after the replica (two pairs never share
one); the pair asks it every `check_interval_s`. Operators may force a transition with
``POST /elastic/merge`` and ``POST /elastic/split`` (under the API key, when one is set).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI

from deploy.errors import APIError

logger = logging.getLogger("ray.serve")
COORDINATOR_PREFIX = "vattn-elastic-coordinator"


def coordinator_name(replica_id: str | None) -> str | None:
    """The coordinator actor's name for one replica (None outside Serve: an unnamed actor)."""
    return None if replica_id is None else f"{COORDINATOR_PREFIX}:{replica_id}"


def make_elastic_engine(args, device: str, replica_id: str | None = None):
    """An `AsyncElasticEngine` over a new pair for `args` (a `deploy.args.AppArgs` with `elastic`)."""
    import ray

    from placement import workers_in_process
    from vattn_ray.elastic import ElasticPair, start_coordinator
    from vattn_ray.elastic.serving import AsyncElasticEngine, PairEngine

    ray_workers = not workers_in_process(args.tensor_parallel_size, device, worker_groups=2)
    coordinator = (start_coordinator(args.elastic, name=coordinator_name(replica_id))
                   if ray.is_initialized() else None)
    pair = ElasticPair(args.engine_args(device), args.elastic, coordinator=coordinator, ray_workers=ray_workers)
    logger.info("elastic pair: two TP=%d groups (%s), coordinator %s", args.tensor_parallel_size,
                "Ray actors" if ray_workers else "in this replica", coordinator_name(replica_id) or "local")
    return AsyncElasticEngine(PairEngine(pair))


def add_elastic_routes(app: FastAPI, server) -> None:
    """``POST /elastic/merge`` and ``/elastic/split``: the transition's event, or 409 when the pair
    is in that state already."""

    from vattn_ray.async_engine import EngineDeadError
    from vattn_ray.elastic.serving import TransitionConflict

    async def transition(action: str) -> dict:
        try:
            return await server.engine.transition(action)
        except TransitionConflict as exc:
            raise APIError(str(exc), status=409, code="conflict") from exc
        except EngineDeadError as exc:
            raise APIError(str(exc), status=503, type="server_error", code="engine_unavailable") from exc

    @app.post("/elastic/merge")
    async def merge() -> dict:
        return await transition("merge")

    @app.post("/elastic/split")
    async def split() -> dict:
        return await transition("split")

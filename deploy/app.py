"""The Ray Serve application: ``serve run deploy/config.yaml`` or import path ``deploy.app:build_app``.

Each replica builds one engine (one TP group) inside the placement group that `placement/` derives
from the TP size, and serves the OpenAI API of `deploy.server` over it. With ``elastic:`` in the
args a replica hosts an elastic pair instead: two TP groups and one head (`deploy/elastic.py`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from ray import serve
from ray.serve import Application

from deploy.args import AppArgs
from deploy.auth import resolve_api_key
from deploy.ingress import ForwardedRequest, Ingress, replay
from deploy.llm_config import is_llm_config_shaped, to_app_args
from deploy.server import OpenAIServer, create_app
from placement import check_resources, serve_deployment_options

logger = logging.getLogger("ray.serve")

EngineFactory = Callable[[AppArgs, str], Any]


def make_engine(args: AppArgs, device: str):
    """The one place a replica's engine is made (tests of the HTTP layer inject another)."""
    import ray

    from vattn_ray.async_engine import AsyncLLMEngine

    if args.elastic is not None:
        from deploy.elastic import make_elastic_engine

        return make_elastic_engine(args, device, _replica_id())
    return AsyncLLMEngine.from_engine_args(args.engine_args(device),
                                           placement_group=ray.util.get_current_placement_group())


@serve.deployment(name="LLMServer")
@serve.ingress()
class LLMServer:
    """One replica: one engine, the OpenAI routes, and the engine gauges exported every second."""

    def __init__(self, args: dict, device: str, engine_factory: EngineFactory | None = None) -> None:
        self.args = AppArgs(**args)
        self.engine = (engine_factory or make_engine)(self.args, device)
        self.server = OpenAIServer(self.engine, self.args.served_names,
                                   max_request_bytes=self.args.max_request_bytes)
        self.server.replica_id = _replica_id()
        self._poller: asyncio.Task | None = None
        self._forward_app = None

    async def forward(self, request: ForwardedRequest):
        """A request forwarded by `deploy.ingress.Ingress`: this replica's OpenAI app answers it; the
        ASGI messages of the response stream back."""
        if self._forward_app is None:
            self._forward_app = create_app(self.server, api_key=resolve_api_key(self.args.api_key))
        async for message in replay(self._forward_app, request):
            yield message

    async def __serve_build_asgi_app__(self):
        self._poller = asyncio.get_running_loop().create_task(self._export_stats())
        return create_app(self.server, api_key=resolve_api_key(self.args.api_key))

    async def _export_stats(self) -> None:
        while True:
            try:
                self.server.record_engine_stats()
            except Exception:  # noqa: BLE001 - metrics must never take the replica down
                logger.warning("could not export engine stats", exc_info=True)
            await asyncio.sleep(self.args.stats_interval_s)

    def check_health(self) -> None:
        """Serve calls this periodically; raising makes Serve replace the replica."""
        self.engine.check_health()

    def __del__(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


def _replica_id() -> str | None:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - outside a Serve replica (tests)
        return None


def resolve_device(args: AppArgs) -> str:
    """"auto" -> "cuda" when the cluster has GPUs, else "cpu" (decides the placement bundles)."""
    if args.device != "auto":
        return args.device
    import ray

    if ray.is_initialized():
        return "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"
    from vattn_ray.config import resolve_device as engine_device

    return engine_device("auto")


def build_app(args: dict | AppArgs | None = None) -> Application:
    """The Serve application for `args` (the ``args:`` of a Serve config): this app's flat arguments
    (`deploy.args.AppArgs`) or Ray Serve LLM's shape (`deploy.llm_config`)."""
    import ray

    if isinstance(args, dict) and is_llm_config_shaped(args):
        args = to_app_args(args)
    app_args = args if isinstance(args, AppArgs) else AppArgs(**(args or {}))
    device = resolve_device(app_args)
    if device == "cpu" and app_args.device == "auto" and app_args.accelerator_type:
        # A GPU model cannot be asked of a cluster without GPUs; serve on its CPUs rather than
        # fail (a config written for GPUs then runs on a laptop cluster unchanged).
        logger.warning("accelerator_type=%s ignored: the cluster has no GPUs, serving on CPU",
                       app_args.accelerator_type)
        app_args = app_args.model_copy(update={"accelerator_type": None})
    placement = serve_deployment_options(
        app_args.tensor_parallel_size, device, app_args.placement_strategy, app_args.accelerator_type,
        replica_cpus=app_args.replica_cpus, worker_cpus=app_args.worker_cpus,
        worker_groups=1 if app_args.elastic is None else 2)
    if app_args.placement_check and ray.is_initialized():
        pair = "" if app_args.elastic is None else " x 2 (an elastic pair)"
        check_resources(placement["placement_group_bundles"], placement["placement_group_strategy"],
                        context=f"tensor_parallel_size={app_args.tensor_parallel_size}{pair}",
                        wait_s=app_args.placement_wait_s)
    logger.info("vattn-ray app: model %s as %r, TP=%d%s on %s, bundles %s (%s)", app_args.model,
                app_args.served_name, app_args.tensor_parallel_size,
                "" if app_args.elastic is None else " x 2 (elastic pair)", device,
                placement["placement_group_bundles"], placement["placement_group_strategy"])
    deployment = LLMServer.options(**placement, **app_args.deployment_options())
    llm = deployment.bind(app_args.model_dump(), device)
    if app_args.request_router != "prefix_aware":
        return llm
    # The router must see the prompt, which Serve's proxy has not read: a front deployment reads
    # it and calls the replicas through a handle (deploy/ingress.py).
    front = Ingress.options(max_ongoing_requests=app_args.ingress_max_ongoing_requests)
    return front.bind(llm, app_args.max_request_bytes)


# Ray Serve LLM's builder name, so `import_path: ray.serve.llm:build_openai_app` ports by module.
build_openai_app = build_app

"""Tensor-parallel size -> Ray placement-group bundles and strategy.

Layout (one replica = one engine = one TP group):

    bundle 0:   replica actor (``replica_cpus`` CPU) + TP worker rank 0 (``worker_cpus`` CPU, 1 GPU)
    bundle i:   TP worker rank i (``worker_cpus`` CPU, 1 GPU),  for i = 1 .. tp-1

Ray Serve schedules the replica actor into bundle 0 of ``placement_group_bundles``, so bundle 0 must
hold the replica's own CPU next to rank 0's resources. At TP > 1 the engine starts worker rank i as
a Ray actor in bundle i; at TP = 1 it runs rank 0 inside the replica process (no actor), so the
replica actor itself claims all of bundle 0, GPU included (see `serve_deployment_options`).
A replica that hosts an elastic pair drives two TP groups (``worker_groups=2``): bundles 0 .. tp-1
hold the first group, tp .. 2tp-1 the second, so the replica reserves 2 x tp GPUs and Serve scales
in pairs; only on CPU at TP = 1 do both groups run inside the replica (`workers_in_process`).
On ``device="cpu"`` the bundles carry no GPU. An ``accelerator_type`` adds the custom resource
``accelerator_type:<T>`` (0.001 per bundle, Ray's convention) so that the group lands on that GPU model.
"""

from __future__ import annotations

from ray.util.placement_group import VALID_PLACEMENT_GROUP_STRATEGIES

DEVICES = ("cuda", "cpu")
# Ray's convention for pinning a GPU model: a tiny amount of the per-node accelerator resource.
ACCELERATOR_RESOURCE_AMOUNT = 0.001


def accelerator_resource(accelerator_type: str) -> str:
    """The custom resource Ray advertises on nodes with that accelerator (e.g. ``accelerator_type:H100``)."""
    return f"accelerator_type:{accelerator_type}"


def bundles_for(tensor_parallel_size: int, device: str = "cuda", accelerator_type: str | None = None,
                *, replica_cpus: float = 1.0, worker_cpus: float = 1.0) -> list[dict]:
    """One bundle per TP worker; bundle 0 also holds the replica (see the module docstring)."""
    if not isinstance(tensor_parallel_size, int) or isinstance(tensor_parallel_size, bool) \
            or tensor_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size must be an integer >= 1, got {tensor_parallel_size!r}")
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES} for placement, got {device!r}")
    if replica_cpus < 0 or worker_cpus < 0:
        raise ValueError(f"replica_cpus and worker_cpus must be >= 0, got {replica_cpus}, {worker_cpus}")
    if accelerator_type is not None and device != "cuda":
        raise ValueError(f"accelerator_type={accelerator_type!r} only applies to device='cuda'")
    bundles = []
    for rank in range(tensor_parallel_size):
        bundle: dict = {"CPU": float(worker_cpus)}
        if device == "cuda":
            bundle["GPU"] = 1.0
            if accelerator_type:
                bundle[accelerator_resource(accelerator_type)] = ACCELERATOR_RESOURCE_AMOUNT
        bundles.append(bundle)
    bundles[0]["CPU"] += float(replica_cpus)
    # Ray rejects bundles whose every amount is zero; keep the CPU key only when it is positive.
    return [{k: v for k, v in b.items() if v > 0} or {"CPU": 0.001} for b in bundles]


def strategy_for(tensor_parallel_size: int, strategy: str = "STRICT_PACK") -> str:
    """Validate the placement strategy against Ray's; TP=1 has one bundle so any strategy fits."""
    if strategy not in VALID_PLACEMENT_GROUP_STRATEGIES:
        raise ValueError(f"placement strategy must be one of {sorted(VALID_PLACEMENT_GROUP_STRATEGIES)}, "
                         f"got {strategy!r}")
    if tensor_parallel_size > 1 and strategy in ("SPREAD", "STRICT_SPREAD"):
        # Tensor parallelism all-reduces every layer; across nodes it is legal but slow.
        import logging

        logging.getLogger(__name__).warning(
            "placement strategy %s may put TP workers on different nodes; tensor_parallel_size=%d "
            "all-reduces every layer, so STRICT_PACK (one node) is usually what you want",
            strategy, tensor_parallel_size)
    return strategy


def workers_in_process(tensor_parallel_size: int, device: str, worker_groups: int = 1) -> bool:
    """Whether a replica runs its workers inside its own process: one group at TP = 1; two groups
    (an elastic pair) only on CPU at TP = 1 (on GPUs each group needs its own devices)."""
    return tensor_parallel_size == 1 and (worker_groups == 1 or device == "cpu")


def serve_deployment_options(tensor_parallel_size: int, device: str = "cuda",
                             strategy: str = "STRICT_PACK", accelerator_type: str | None = None,
                             *, replica_cpus: float = 1.0, worker_cpus: float = 1.0,
                             worker_groups: int = 1) -> dict:
    """The options a Serve deployment needs to host `worker_groups` TP groups per replica (one;
    two for an elastic pair).

    ``ray_actor_options`` is the replica actor's own demand, which must fit in bundle 0: with its
    workers in process (`workers_in_process`) the replica takes bundle 0 whole (its GPU too, and
    the CPUs of every in-process worker); otherwise the worker actors hold the GPUs and the replica
    takes only ``replica_cpus``.
    """
    if worker_groups not in (1, 2):
        raise ValueError(f"worker_groups must be 1 or 2 (an elastic pair), got {worker_groups!r}")
    in_process = workers_in_process(tensor_parallel_size, device, worker_groups)
    if in_process:
        bundles = bundles_for(1, device, accelerator_type, worker_cpus=worker_cpus,
                              replica_cpus=replica_cpus + (worker_groups - 1) * worker_cpus)
    else:
        bundles = bundles_for(tensor_parallel_size * worker_groups, device, accelerator_type,
                              replica_cpus=replica_cpus, worker_cpus=worker_cpus)
    actor_options = {
        "num_cpus": bundles[0].get("CPU", 0.0) if in_process else float(replica_cpus),
        "num_gpus": bundles[0].get("GPU", 0.0) if in_process else 0,
    }
    return {
        "placement_group_bundles": bundles,
        "placement_group_strategy": strategy_for(tensor_parallel_size, strategy),
        "ray_actor_options": actor_options,
    }

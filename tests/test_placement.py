"""Placement: bundle layout, strategy validation, and fail-fast resource checks."""

from __future__ import annotations

import pytest

from placement import (PlacementError, bundles_for, check_resources, placement_problem,
                       serve_deployment_options, strategy_for, workers_in_process)

GPU_NODE = {"CPU": 8.0, "GPU": 1.0, "memory": 1e10}
TWO_GPU_NODE = {"CPU": 16.0, "GPU": 2.0, "accelerator_type:H100": 1.0}


def test_bundle_zero_holds_the_replica_and_rank_zero():
    assert bundles_for(1) == [{"CPU": 2.0, "GPU": 1.0}]
    assert bundles_for(4) == [{"CPU": 2.0, "GPU": 1.0}] + [{"CPU": 1.0, "GPU": 1.0}] * 3
    assert bundles_for(2, "cpu") == [{"CPU": 2.0}, {"CPU": 1.0}]
    assert bundles_for(1, "cpu", replica_cpus=0.5, worker_cpus=0.5) == [{"CPU": 1.0}]


def test_accelerator_type_adds_the_ray_marker_resource():
    assert bundles_for(2, "cuda", "H100") == [
        {"CPU": 2.0, "GPU": 1.0, "accelerator_type:H100": 0.001},
        {"CPU": 1.0, "GPU": 1.0, "accelerator_type:H100": 0.001},
    ]
    with pytest.raises(ValueError, match="accelerator_type"):
        bundles_for(1, "cpu", "H100")


@pytest.mark.parametrize("tp", [0, -1, 1.5, True, "2"])
def test_bad_tensor_parallel_size_names_the_field(tp):
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        bundles_for(tp)


def test_bad_device_is_rejected():
    with pytest.raises(ValueError, match="device"):
        bundles_for(1, "tpu")


def test_strategy_is_validated_against_rays_list():
    for s in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
        assert strategy_for(2, s) == s
    with pytest.raises(ValueError, match="STRICT_PACK"):
        strategy_for(2, "TIGHT")


def test_serve_options_pin_the_replica_into_bundle_zero():
    opts = serve_deployment_options(2, "cuda", "STRICT_PACK", replica_cpus=1, worker_cpus=2)
    assert opts["placement_group_strategy"] == "STRICT_PACK"
    assert opts["placement_group_bundles"] == [{"CPU": 3.0, "GPU": 1.0}, {"CPU": 2.0, "GPU": 1.0}]
    assert opts["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0}
    # The replica's own demand fits in bundle 0 (Serve requires it).
    assert opts["ray_actor_options"]["num_cpus"] <= opts["placement_group_bundles"][0]["CPU"]


def test_at_tp1_the_replica_hosts_the_worker_and_takes_bundle_zero_whole():
    opts = serve_deployment_options(1, "cuda", replica_cpus=1, worker_cpus=1)
    assert opts["placement_group_bundles"] == [{"CPU": 2.0, "GPU": 1.0}]
    assert opts["ray_actor_options"] == {"num_cpus": 2.0, "num_gpus": 1.0}
    cpu = serve_deployment_options(1, "cpu", replica_cpus=0.5, worker_cpus=0.5)
    assert cpu["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.0}


def test_an_elastic_pair_reserves_two_tp_groups_per_replica():
    """Group A in bundles [0, tp), group B in [tp, 2 tp); the replica (its head) only its CPUs. On
    CPU at TP=1 both groups run inside the replica, which takes their CPUs in one bundle."""
    opts = serve_deployment_options(2, "cuda", replica_cpus=1, worker_cpus=2, worker_groups=2)
    assert opts["placement_group_bundles"] == [{"CPU": 3.0, "GPU": 1.0}] + [{"CPU": 2.0, "GPU": 1.0}] * 3
    assert opts["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0}
    tp1 = serve_deployment_options(1, "cuda", replica_cpus=1, worker_cpus=2, worker_groups=2)
    assert tp1["placement_group_bundles"] == [{"CPU": 3.0, "GPU": 1.0}, {"CPU": 2.0, "GPU": 1.0}]
    assert tp1["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0}
    assert not workers_in_process(1, "cuda", 2) and workers_in_process(1, "cpu", 2)
    cpu = serve_deployment_options(1, "cpu", replica_cpus=0.5, worker_cpus=0.5, worker_groups=2)
    assert cpu["placement_group_bundles"] == [{"CPU": 1.5}]
    assert cpu["ray_actor_options"] == {"num_cpus": 1.5, "num_gpus": 0.0}
    with pytest.raises(ValueError, match="worker_groups"):
        serve_deployment_options(1, "cuda", worker_groups=3)


def test_strict_pack_needs_every_gpu_on_one_node():
    bundles = bundles_for(2)
    with pytest.raises(PlacementError) as err:
        check_resources(bundles, "STRICT_PACK", nodes=[GPU_NODE, GPU_NODE], context="tensor_parallel_size=2")
    msg = str(err.value)
    assert "tensor_parallel_size=2 needs 2 GPUs on one node" in msg
    assert "the largest node has 1 GPU" in msg and "STRICT_PACK" in msg
    check_resources(bundles, "STRICT_PACK", nodes=[GPU_NODE, TWO_GPU_NODE])


def test_pack_and_spread_may_use_several_nodes():
    bundles = bundles_for(2)
    check_resources(bundles, "PACK", nodes=[GPU_NODE, GPU_NODE])
    check_resources(bundles, "STRICT_SPREAD", nodes=[GPU_NODE, GPU_NODE])
    assert "needs 2 nodes" in placement_problem(bundles, "STRICT_SPREAD", [TWO_GPU_NODE])
    assert "in the cluster; the cluster has 1 GPU" in placement_problem(bundles, "PACK", [GPU_NODE])


def test_missing_accelerator_type_and_empty_cluster_are_named():
    assert "no node has it" in placement_problem(bundles_for(1, "cuda", "A100"), "PACK", [TWO_GPU_NODE])
    assert placement_problem(bundles_for(1, "cuda", "H100"), "PACK", [TWO_GPU_NODE]) is None
    assert "no alive nodes" in placement_problem(bundles_for(1), "PACK", [])


def test_cpu_shortfall_is_reported_for_cpu_bundles():
    problem = placement_problem(bundles_for(2, "cpu"), "STRICT_PACK", [{"CPU": 2.0}])
    assert problem == "needs 3 CPUs on one node; the largest node has 2 CPUs"


def test_check_against_a_live_cluster_fails_fast_and_places_what_fits():
    """On a real local Ray (fake GPUs declared as resources), a feasible group is placed and an
    infeasible one is refused at once instead of pending forever."""
    import time

    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    ray.init(num_cpus=2, num_gpus=2, resources={"accelerator_type:FAKE": 1}, include_dashboard=False,
             log_to_driver=False)
    try:
        ok = bundles_for(2, "cuda", "FAKE", replica_cpus=0, worker_cpus=1)
        check_resources(ok, "STRICT_PACK", context="tensor_parallel_size=2")
        pg = placement_group(ok, strategy="STRICT_PACK")
        assert pg.wait(timeout_seconds=30), "a group that passed the check must be placeable"
        remove_placement_group(pg)

        start = time.monotonic()
        with pytest.raises(PlacementError, match="needs 4 GPUs on one node; the largest node has 2 GPUs"):
            check_resources(bundles_for(4, replica_cpus=0, worker_cpus=0.1), "STRICT_PACK",
                            context="tensor_parallel_size=4")
        assert time.monotonic() - start < 5
    finally:
        ray.shutdown()

"""Ray Serve LLM-shaped application arguments (deploy/llm_config.py): the mapping onto this app's
arguments, the errors for what does not map, and the flat keys still working. No Ray cluster."""

from __future__ import annotations

import pytest
import yaml
from pydantic import ValidationError

from deploy.app import build_app, build_openai_app
from deploy.args import AppArgs
from deploy.llm_config import to_app_args

LLM_CONFIG = {
    "model_loading_config": {"model_id": "qwen-0.5b", "model_source": "builtin:tiny-llama"},
    "accelerator_type": "A10G",
    "deployment_config": {"autoscaling_config": {"min_replicas": 1, "max_replicas": 2},
                          "max_ongoing_requests": 48},
    "engine_kwargs": {"tensor_parallel_size": 2, "max_model_len": 1024, "enforce_eager": True,
                      "trust_remote_code": True, "gpu_memory_utilization": 0.8},
    "placement_group_config": {"bundles": [{"GPU": 1, "CPU": 2}, {"GPU": 1, "CPU": 2}], "strategy": "STRICT_PACK"},
}


def test_every_key_maps_onto_the_flat_arguments():
    flat = to_app_args({"llm_configs": [LLM_CONFIG]})
    assert flat == {
        "model": "builtin:tiny-llama", "served_model_name": "qwen-0.5b", "tensor_parallel_size": 2,
        "max_model_len": 1024, "gpu_memory_utilization": 0.8, "engine_kwargs": {"enforce_eager": True},
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 2}, "max_ongoing_requests": 48,
        "accelerator_type": "A10G", "placement_strategy": "STRICT_PACK", "worker_cpus": 2.0}
    args = AppArgs(**flat)
    engine = args.engine_args("cuda")
    assert (engine.model, engine.tensor_parallel_size, engine.max_model_len, engine.enforce_eager) == \
        ("builtin:tiny-llama", 2, 1024, True)
    assert args.served_names == ["qwen-0.5b"]
    assert to_app_args(LLM_CONFIG) == flat  # build_llm_deployment's shape: the LLMConfig itself


def test_model_source_defaults_to_model_id_and_files_are_read(tmp_path):
    assert to_app_args({"model_loading_config": {"model_id": "org/name"}})["model"] == "org/name"
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(LLM_CONFIG))
    assert to_app_args({"llm_configs": [str(path)]}) == to_app_args(LLM_CONFIG)
    bpw = {**LLM_CONFIG, "placement_group_config": {"bundle_per_worker": {"GPU": 1, "CPU": 3}}}
    assert to_app_args(bpw)["worker_cpus"] == 3.0
    for on in (True, False):  # vLLM's switch maps onto the engine's own
        kwargs = {**LLM_CONFIG["engine_kwargs"], "enable_prefix_caching": on}
        assert to_app_args({**LLM_CONFIG, "engine_kwargs": kwargs})["enable_prefix_caching"] is on


@pytest.mark.parametrize("change, words", [
    ({"llm_configs": [LLM_CONFIG, LLM_CONFIG]}, "exactly one model"),
    ({"llm_configs": [LLM_CONFIG], "ingress_deployment_config": {}}, "only llm_configs"),
    ({**LLM_CONFIG, "model_loading_config": {"model_source": "x"}}, "model_id is required"),
    ({**LLM_CONFIG, "model_loading_config": {"model_id": "m", "model_source": {"bucket_uri": "s3://b"}}},
     "cloud mirrors"),
    ({**LLM_CONFIG, "engine_kwargs": {"quantization": "fp8"}}, "engine_kwargs.quantization is not supported"),
    ({**LLM_CONFIG, "engine_kwargs": {"pipeline_parallel_size": 2}}, "no pipeline parallelism"),
    ({**LLM_CONFIG, "deployment_config": {"ray_actor_options": {"num_cpus": 4}}}, "ray_actor_options is not"),
    ({**LLM_CONFIG, "placement_group_config": {"bundles": [{"GPU": 1}]}}, "one bundle per tensor-parallel"),
    ({**LLM_CONFIG, "placement_group_config": {"bundles": [{"GPU": 2}, {"GPU": 2}]}}, "at most one GPU"),
    ({**LLM_CONFIG, "lora_config": {"max_num_adapters_per_replica": 2}}, "LoRA"),
    ({**LLM_CONFIG, "runtime_env": {"pip": ["x"]}}, "runtime_env is not supported"),
    ({**LLM_CONFIG, "llm_engine": "SGLang"}, "llm_engine"),
    ({**LLM_CONFIG, "model": "builtin:tiny-llama"}, "mix Ray Serve LLM keys"),
    ({**LLM_CONFIG, "bogus": 1}, "not LLMConfig fields"),
])
def test_what_does_not_map_is_a_clear_error(change, words):
    with pytest.raises(ValueError, match=words):
        to_app_args(change)


def test_flat_arguments_still_work_and_build_the_same_deployment():
    ray_shaped = build_openai_app({"llm_configs": [{
        "model_loading_config": {"model_id": "tiny", "model_source": "builtin:tiny-llama"},
        "engine_kwargs": {"max_model_len": 512, "enforce_eager": True},
        "deployment_config": {"num_replicas": 2}}]})
    flat = build_app({"model": "builtin:tiny-llama", "served_model_name": "tiny", "max_model_len": 512,
                      "engine_kwargs": {"enforce_eager": True}, "num_replicas": 2})
    a, b = ray_shaped._bound_deployment, flat._bound_deployment
    assert a.init_args == b.init_args
    assert a._deployment_config.num_replicas == b._deployment_config.num_replicas == 2
    assert a._replica_config.placement_group_bundles == b._replica_config.placement_group_bundles


def test_accelerator_type_is_dropped_on_a_cluster_without_gpus_only_when_device_is_auto():
    app = build_app({"model_loading_config": {"model_id": "m", "model_source": "builtin:tiny-llama"},
                     "accelerator_type": "A10G"})
    assert app._bound_deployment.init_args[0]["accelerator_type"] is None
    assert app._bound_deployment.init_args[1] == "cpu"
    with pytest.raises(ValueError, match="only applies to device='cuda'"):
        build_app({"model": "builtin:tiny-llama", "device": "cpu", "accelerator_type": "A10G"})


def test_engine_kwargs_and_served_names_of_the_flat_shape_are_checked():
    with pytest.raises(ValidationError, match="set max_model_len as an argument of its own"):
        AppArgs(engine_kwargs={"max_model_len": 5})
    with pytest.raises(ValidationError, match="not an engine argument"):
        AppArgs(engine_kwargs={"nope": 1})
    with pytest.raises(ValidationError, match="non-empty list"):
        AppArgs(served_model_name=[])
    assert AppArgs(served_model_name=["a", "b"]).served_name == "a"

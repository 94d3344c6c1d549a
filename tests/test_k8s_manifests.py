"""KubeRay manifests and Serve config files are valid: the CRDs' OpenAPI schemas (k8s/crds/, the
public KubeRay CRDs) via jsonschema, Ray's own ServeDeploySchema, and our AppArgs."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from deploy.args import AppArgs

ROOT = Path(__file__).resolve().parent.parent
CRDS = {"RayService": "ray.io_rayservices.yaml", "RayCluster": "ray.io_rayclusters.yaml"}
MANIFESTS = sorted((ROOT / "k8s").glob("*.yaml"))
SERVE_CONFIGS = sorted((ROOT / "deploy").glob("config*.yaml"))


def closed(schema):
    """The schema with unknown fields forbidden wherever Kubernetes would prune them.

    The API server silently drops fields a structural schema does not list (a typo such as
    `enableInTreeAutoScaling` would vanish); plain jsonschema would accept them, so we close every
    object that lists its properties and does not opt into unknown fields.
    """
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed(v) for k, v in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema \
            and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_schema(kind: str, version: str) -> dict:
    # The CRDs are ~1 MB of YAML each: parse once, with the C loader when PyYAML has it.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load((ROOT / "k8s" / "crds" / CRDS[kind]).read_text(), Loader=loader)
    (v,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = closed(v["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta is validated by Kubernetes itself
    return schema


def load_manifests() -> list[tuple[str, dict]]:
    docs = []
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("apiVersion", "").startswith("ray.io/"):
                docs.append((path.name, doc))
    return docs


def validate_serve_config(config: dict) -> None:
    ServeDeploySchema.model_validate(config)
    for app in config["applications"]:
        assert app["import_path"] == "deploy.app:build_app"
        AppArgs(**app.get("args", {}))  # typos in args fail here (extra="forbid")


def test_the_manifests_we_expect_exist():
    kinds = sorted(doc["kind"] for _, doc in load_manifests())
    assert kinds == ["RayCluster", "RayService"]
    assert {p.name for p in SERVE_CONFIGS} == {"config.yaml", "config.gpu.yaml", "config.autoscale.gpu.yaml",
                                            "config.tp4.gpu.yaml", "config.elastic.yaml",
                                            "config.elastic.gpu.yaml"}


@pytest.mark.parametrize("name, doc", load_manifests(), ids=lambda x: x if isinstance(x, str) else "")
def test_manifest_matches_the_kuberay_crd(name, doc):
    version = doc["apiVersion"].split("/", 1)[1]
    jsonschema.validate(doc, crd_schema(doc["kind"], version))


def test_schema_check_catches_a_misspelled_field():
    _, doc = next((n, d) for n, d in load_manifests() if d["kind"] == "RayService")
    bad = copy.deepcopy(doc)
    bad["spec"]["rayClusterConfig"]["enableInTreeAutoScaling"] = True
    with pytest.raises(jsonschema.ValidationError, match="enableInTreeAutoScaling"):
        jsonschema.validate(bad, crd_schema("RayService", "v1"))
    bad = copy.deepcopy(doc)
    bad["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-gpus"] = 0  # must be a string
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, crd_schema("RayService", "v1"))


def test_rayservice_shape_head_without_gpus_autoscaling_gpu_workers():
    (doc,) = [d for _, d in load_manifests() if d["kind"] == "RayService"]
    cluster = doc["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    serve = yaml.safe_load(doc["spec"]["serveConfigV2"])
    tp = serve["applications"][0]["args"]["tensor_parallel_size"]
    gpu_groups = [g for g in cluster["workerGroupSpecs"]
                  if g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")]
    assert gpu_groups, "a GPU worker group"
    # STRICT_PACK puts a replica's TP group on one node: a worker node must have >= tp GPUs.
    assert max(int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
               for g in gpu_groups) >= tp
    for c in [cluster["headGroupSpec"]["template"]["spec"]["containers"][0]] + \
             [g["template"]["spec"]["containers"][0] for g in cluster["workerGroupSpecs"]]:
        assert "2.60.0-py311-gpu" in c["image"]


def test_embedded_serve_config_is_valid_and_equals_the_gpu_config_file():
    (doc,) = [d for _, d in load_manifests() if d["kind"] == "RayService"]
    embedded = yaml.safe_load(doc["spec"]["serveConfigV2"])
    validate_serve_config(embedded)
    assert embedded == yaml.safe_load((ROOT / "deploy" / "config.gpu.yaml").read_text())


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda p: p.name)
def test_serve_config_files_pass_rays_schema_and_our_args(path):
    validate_serve_config(yaml.safe_load(path.read_text()))


def test_serve_schema_check_rejects_a_bad_config():
    config = yaml.safe_load((ROOT / "deploy" / "config.yaml").read_text())
    config["applications"][0]["args"]["max_num_seq"] = 4  # typo
    with pytest.raises(Exception, match="max_num_seq"):
        validate_serve_config(config)
    config = yaml.safe_load((ROOT / "deploy" / "config.yaml").read_text())
    config["applications"][0]["deployments"] = [{"name": "LLMServer", "num_replicas": -3}]
    with pytest.raises(Exception, match="num_replicas"):
        validate_serve_config(config)

"""A Ray Serve LLM config, as its docs give it, served with only its import path changed.

The config names a Hugging Face repo (Qwen/Qwen2.5-0.5B-Instruct) and an A10G. CI has neither
network nor GPUs, so: the Hugging Face cache the replica reads (HF_HOME, offline) holds that repo
id with the built-in tiny model's files in it (the replica resolves the id through the cache exactly
as it would after a download), and on a cluster without GPUs the app serves on CPU with a warning
instead of asking for an A10G. Everything else in the YAML is Ray Serve LLM's.
"""

from __future__ import annotations

import shutil

import httpx
import openai
import pytest
import yaml
from serve_run import serve_run

from vattn_ray import LLM, SamplingParams
from vattn_ray.config import resolve_model_path

# Ray Serve LLM's quick-start config file; the one change: import_path (was ray.serve.llm:build_openai_app).
RAY_SERVE_LLM_YAML = """
applications:
- args:
    llm_configs:
      - model_loading_config:
          model_id: qwen-0.5b
          model_source: Qwen/Qwen2.5-0.5B-Instruct
        accelerator_type: A10G
        deployment_config:
          autoscaling_config:
            min_replicas: 1
            max_replicas: 2
  import_path: deploy.app:build_openai_app
  name: llm_app
  route_prefix: "/"
"""
REPO = "Qwen/Qwen2.5-0.5B-Instruct"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    hf_home = tmp_path_factory.mktemp("hf")
    repo_dir = hf_home / "hub" / f"models--{REPO.replace('/', '--')}"
    revision = "0" * 40
    shutil.copytree(resolve_model_path("builtin:tiny-llama"), repo_dir / "snapshots" / revision)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(revision)
    env = {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    with serve_run(yaml.safe_load(RAY_SERVE_LLM_YAML), tmp_path_factory.mktemp("serve"), env) as (base, _):
        yield base


def test_the_example_serves_its_model_id(served):
    client = openai.OpenAI(base_url=f"{served}/v1", api_key="fake-key", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list()] == ["qwen-0.5b"]
    chat = client.chat.completions.create(model="qwen-0.5b", messages=[{"role": "user", "content": "Hello!"}],
                                          max_tokens=8)
    assert chat.model == "qwen-0.5b" and chat.usage.completion_tokens >= 1
    # The weights are the ones the repo id resolved to in the cache.
    prompt = "The quick brown fox"
    served_text = client.completions.create(model="qwen-0.5b", prompt=prompt, max_tokens=8,
                                            temperature=0).choices[0].text
    with LLM("builtin:tiny-llama", device="cpu", max_model_len=256) as llm:
        (out,) = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0))
    assert served_text == out.outputs[0].text
    assert httpx.get(f"{served}/health", timeout=10).json() == {"status": "ok"}

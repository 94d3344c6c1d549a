"""GPU: structured output with CUDA-graph decode (1 GPU) and with TP=2 over NCCL (2 GPUs).

The masks are built on the head, travel in the plan and are applied by every rank's sampler to the
logits that the captured decode graph produced. Every output must parse and validate. The cost of
constrained decoding is reported (tokens/s with and without a schema, same prompts) to
$VATTN_RESULTS_DIR/structured_cuda.json when that variable is set.

    python -m pytest -q tests/gpu/test_structured_cuda.py -k cuda_graph   # 1 GPU
    python -m pytest -q tests/gpu/test_structured_cuda.py                 # both, on the 2-GPU machine
"""

from __future__ import annotations

import json
import os
import time

import jsonschema
import pytest
import torch

from vattn_ray import LLM, SamplingParams
from vattn_ray.model.builder import build_random_checkpoint
from vattn_ray.ray_executor import WORKER_ENV
from vattn_ray.sampling_params import StructuredOutputsParams

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 4},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                     "zip": {"type": "integer", "minimum": 10000, "maximum": 99999}},
                    "required": ["city", "zip"]},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "address", "ok"],
}
PROMPTS = [f"Person {i} as JSON:" for i in range(32)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # Llama-3 vocabulary size, so the masks are full-size (128256 tokens = 4008 words a row).
    path = str(tmp_path_factory.mktemp("gpu-so") / "llama")
    return build_random_checkpoint(path, "llama", seed=5, dtype="bfloat16", hidden_size=1024,
                                   num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                                   intermediate_size=2816, head_dim=128, vocab_size=128256,
                                   max_position_embeddings=4096, init_std=0.02)


def _check(outs) -> int:
    tokens = 0
    for out in outs:
        for o in out.outputs:
            assert o.finish_reason == "stop", (o.finish_reason, o.text[:200])
            jsonschema.validate(json.loads(o.text), SCHEMA)
            tokens += len(o.token_ids)
    return tokens


def _report(name: str, value: dict) -> None:
    out_dir = os.environ.get("VATTN_RESULTS_DIR")
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, "structured_cuda.json")
        data = json.load(open(path)) if os.path.exists(path) else {}
        data[name] = value
        with open(path, "w") as f:
            json.dump(data, f, indent=2)


def test_json_schema_with_cuda_graph_decode(checkpoint):
    with LLM(checkpoint, device="cuda", dtype="bfloat16", max_model_len=2048, gpu_memory_utilization=0.5,
             attention_backend="torch") as llm:
        worker = llm.engine.executor.worker
        assert worker.graphs is not None, "decode steps should replay CUDA graphs"
        spec = StructuredOutputsParams(json=SCHEMA)
        greedy = SamplingParams(max_tokens=1500, temperature=0.0, structured_outputs=spec)
        seeded = SamplingParams(max_tokens=1500, temperature=1.0, seed=7, n=2, structured_outputs=spec)
        t = time.perf_counter()
        outs = llm.generate(PROMPTS, [greedy] * 24 + [seeded] * 8)
        constrained_s = time.perf_counter() - t
        tokens = _check(outs)
        llm.engine.check_integrity()
        assert not llm.engine.needs_sync()
        # The same number of tokens without a grammar: what the masks cost per token.
        plain = [SamplingParams(max_tokens=len(o.outputs[0].token_ids), temperature=0.0, ignore_eos=True)
                 for o in outs]
        t = time.perf_counter()
        llm.generate(PROMPTS, plain)
        plain_s = time.perf_counter() - t
    _report("tp1_cuda_graphs", {"device": torch.cuda.get_device_name(), "sequences": 40, "tokens": tokens,
                                "constrained_s": constrained_s, "unconstrained_first_seq_tokens_s": plain_s})


def test_json_schema_tp2(checkpoint):
    import ray  # only this test needs Ray (the 1-GPU test runs where Ray is not installed)

    assert torch.cuda.device_count() >= 2, "the TP=2 case needs 2 GPUs (the 2xH200 machine)"
    ray.init(include_dashboard=False, runtime_env={"env_vars": WORKER_ENV})
    try:
        with LLM(checkpoint, tensor_parallel_size=2, device="cuda", dtype="bfloat16", max_model_len=2048,
                 gpu_memory_utilization=0.5, attention_backend="torch") as llm:
            spec = StructuredOutputsParams(json=SCHEMA)
            outs = llm.generate(PROMPTS[:16], SamplingParams(max_tokens=1500, temperature=0.0, structured_outputs=spec))
            tokens = _check(outs)
            llm.engine.check_integrity()
        _report("tp2", {"sequences": 16, "tokens": tokens})
    finally:
        ray.shutdown()

"""An elastic pair served the way a user serves it: ``serve run deploy/config.elastic.yaml`` in a
subprocess (its own local Ray cluster, the coordinator as a Ray actor named after the replica),
streaming completions over HTTP while the test forces a merge and a split. The streamed text equals
the same greedy requests on an ordinary engine (elastic off, float32), integrity holds after each
transition, and /stats and /metrics show both transitions. The policy is switched off
(``elastic.enabled: false``: the pair still asks the coordinator) so that only the test transitions.
"""

from __future__ import annotations

import json
import threading

import httpx
import pytest
import yaml
from serve_run import ROOT, checked_stats, serve_run, wait_until

from deploy.args import AppArgs
from vattn_ray import LLM, SamplingParams

CONFIG = ROOT / "deploy" / "config.elastic.yaml"
MODEL = "tiny-llama"
MAX_TOKENS = 160
PROMPTS = [f"Stream {i}: the elastic pair {'merges ' * (i % 4)}and splits" for i in range(10)]


@pytest.fixture(scope="module")
def config() -> dict:
    config = yaml.safe_load(CONFIG.read_text())
    args = config["applications"][0]["args"]
    args["elastic"] = {**args["elastic"], "enabled": False}
    return config


@pytest.fixture(scope="module")
def served(config, tmp_path_factory):

    with serve_run(config, tmp_path_factory.mktemp("elastic-serve")) as served:
        yield served


@pytest.fixture(scope="module")
def reference(config) -> list[str]:
    """The same greedy requests on an ordinary engine with the config's engine arguments."""
    args = AppArgs(**config["applications"][0]["args"]).engine_args("cpu")
    kwargs = {k: v for k, v in vars(args).items() if k not in ("model", "extra")}
    with LLM(model=args.model, **kwargs) as llm:
        outs = llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True))
    return [o.outputs[0].text for o in outs]


def _stream(base: str, prompt: str, chunks: list[str], errors: list) -> None:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
            "stream": True}
    try:
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=120) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    event = json.loads(line[6:])
                    assert "error" not in event, event
                    chunks.append(event["choices"][0]["text"])
    except Exception as exc:  # noqa: BLE001 - reported by the test
        errors.append(exc)


def _wait(cond, what: str, timeout_s: float = 60) -> None:
    wait_until(cond, what, timeout_s)


def _integrity(base: str) -> dict:
    return checked_stats(base, 60)


def test_streams_through_a_forced_merge_and_split_equal_elastic_off(served, reference):
    base, _ = served
    chunks = [[] for _ in PROMPTS]
    errors: list = []
    threads = [threading.Thread(target=_stream, args=(base, p, c, errors)) for p, c in zip(PROMPTS, chunks)]
    for t in threads:
        t.start()
    _wait(lambda: all(len(c) >= 2 for c in chunks) or errors, "every stream to start")
    merge = httpx.post(f"{base}/elastic/merge", timeout=60)
    assert merge.status_code == 200, merge.text
    assert _integrity(base)["elastic"]["state"] == "merged"
    at_merge = sum(map(len, chunks))
    _wait(lambda: sum(map(len, chunks)) > at_merge + 20 or errors, "tokens after the merge")
    split = httpx.post(f"{base}/elastic/split", timeout=60)
    assert split.status_code == 200, split.text
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert ["".join(c) for c in chunks] == reference
    merge, split = merge.json(), split.json()
    assert merge["requests_recomputed"] > 0 and split["requests_recomputed"] > 0  # streams were mid-way
    assert split["restore_bytes"] > 0

    stats = _integrity(base)["elastic"]
    assert (stats["state"], stats["merges"], stats["splits"]) == ("split", 1, 1)
    assert [e["event"] for e in stats["events"]] == ["merge", "split"]
    metrics = httpx.get(f"{base}/metrics").text
    for line in (f'vattn:elastic_merges_total{{model_name="{MODEL}"}} 1.0',
                 f'vattn:elastic_splits_total{{model_name="{MODEL}"}} 1.0',
                 f'vattn:elastic_merged{{model_name="{MODEL}"}} 0.0',
                 f'vattn:elastic_restore_seconds_count{{model_name="{MODEL}"}} 1.0'):
        assert line in metrics, line
    assert httpx.post(f"{base}/elastic/split").status_code == 409  # split already


def test_requests_a_pair_cannot_serve_get_a_400(served):
    base, _ = served
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 4}
    r = httpx.post(f"{base}/v1/completions", json={**body, "n": 2}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "n", r.text
    r = httpx.post(f"{base}/v1/chat/completions", timeout=30, json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
        "response_format": {"type": "json_object"}})
    assert r.status_code == 400 and "elastic pair" in r.json()["error"]["message"], r.text
    assert httpx.post(f"{base}/v1/completions", json=body, timeout=30).status_code == 200  # still serving

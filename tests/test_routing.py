"""Prefix-aware routing between replicas: the keys it routes by, and a real two-replica run on CPU
(the Serve app of deploy/, the built-in model) whose prefix cache hit rate beats round-robin's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from deploy.routing import block_keys, route_text

ROOT = Path(__file__).resolve().parent.parent


def test_keys_follow_the_prompt_prefix():
    a = route_text("POST", "/v1/completions", json.dumps({"prompt": "s" * 300 + "first"}).encode())
    b = route_text("POST", "/v1/completions", json.dumps({"prompt": ["s" * 300 + "second"]}).encode())
    ka, kb = block_keys(a, 128), block_keys(b, 128)
    assert len(ka) == len(kb) == 2 and ka == kb  # the full blocks are the shared prefix
    assert block_keys("t" + a[1:], 128)[1] != ka[1]  # a key names everything before it
    chat = {"messages": [{"role": "system", "content": "x" * 200}, {"role": "user", "content": "hi"}]}
    longer = {"messages": chat["messages"] + [{"role": "assistant", "content": [{"type": "text", "text": "y" * 300}]}]}
    kc = block_keys(route_text("POST", "/v1/chat/completions", json.dumps(chat).encode()), 64)
    kl = block_keys(route_text("POST", "/v1/chat/completions", json.dumps(longer).encode()), 64)
    assert kc and kl[:len(kc)] == kc and len(kl) > len(kc)  # a later turn extends the earlier keys
    moved = {"messages": [{"role": "user", "content": "x" * 200}, {"role": "user", "content": "hi"}]}
    assert block_keys(route_text("POST", "/v1/chat/completions", json.dumps(moved).encode()), 64)[0] != kc[0]
    for method, path, body in [("GET", "/stats", b""), ("POST", "/v1/completions", b"{not json"),
                               ("POST", "/tokenize", b'{"prompt": "x"}')]:
        assert route_text(method, path, body) is None


def test_prefix_aware_routing_beats_round_robin(tmp_path):
    out = tmp_path / "routing.json"
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "vattn_ray.bench", "routing", "--routers", "prefix_aware",
                           "round_robin", "--num-requests", "16", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = {r["router"]: r for r in json.loads(out.read_text())["runs"]}
    for r in runs.values():
        assert r["completed"] == 16 and not r["failures"], r
        assert r["replicas_seen"] == 2 and all(s["prefix_cache_queries"] > 0 for s in r["replicas"].values()), r
        assert r["cached_tokens_in_responses"] == r["prefix_cache_hits"], r
    assert runs["prefix_aware"]["hit_rate"] > runs["round_robin"]["hit_rate"], runs

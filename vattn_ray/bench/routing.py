"""Prefix cache hit rate across replicas: prefix-aware routing against round-robin (and Serve's default).

    python -m vattn_ray.bench routing --out docs/results/routing_cpu.json

Starts a local Ray cluster and, for each router in --routers in turn, the Serve app of `deploy/`
with --replicas replicas of the built-in tiny model on CPU (its `request_router` set to that
router), then sends the same workload over HTTP: --num-requests completions, each one of
--num-prefixes long shared "system prompts" (~--prefix-chars characters) followed by a short user
turn of its own, in one seeded random order, --concurrency at a time, greedy, --max-tokens out.
Afterwards `GET /stats` is polled until every replica has answered; each replica reports the prompt
tokens it looked up in its prefix cache and those served from it (`prefix_cache_queries`,
`prefix_cache_hits`, vLLM's meaning). The hit rate of a run is hits / queries over all replicas.
KV pages are --page-bytes so that a page group holds few tokens of the tiny model (16 at 4096),
as a 2 MiB group holds 32 tokens of an 8B model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import time
from typing import Any

import httpx

ROUTERS = ("prefix_aware", "round_robin", "power_of_two")
WORDS = ("weather", "travel", "invoice", "garden", "orbit", "recipe", "ledger", "harbor", "violin", "glacier",
         "pepper", "canyon", "signal", "lantern", "meadow", "copper", "ticket", "puzzle", "saddle", "breeze")


def workload(num_prefixes: int, prefix_chars: int, num_requests: int, seed: int) -> list[tuple[int, str]]:
    """(prefix index, prompt) for each request, in the order sent: every prefix equally often."""
    rng = random.Random(seed)
    prefixes = []
    for p in range(num_prefixes):
        words = [f"System prompt {p}: you are assistant number {p}."]
        while sum(len(w) + 1 for w in words) < prefix_chars:
            words.append(rng.choice(WORDS))
        prefixes.append(" ".join(words) + "\n")
    order = [i % num_prefixes for i in range(num_requests)]
    rng.shuffle(order)
    return [(p, f"{prefixes[p]}User {i} asks about the {rng.choice(WORDS)} {rng.randint(0, 999)}?")
            for i, p in enumerate(order)]


def app_args(args: argparse.Namespace, router: str) -> dict[str, Any]:
    return {"model": "builtin:tiny-llama", "served_model_name": "tiny-llama", "device": "cpu",
            "max_model_len": 512, "max_num_seqs": 16, "max_num_batched_tokens": 512,
            "replica_cpus": args.replica_cpus, "worker_cpus": args.worker_cpus, "num_replicas": args.replicas,
            "request_router": router, "engine_kwargs": {"page_bytes": args.page_bytes}}


async def send_all(base: str, prompts: list[tuple[int, str]], concurrency: int, max_tokens: int) -> dict:
    sem = asyncio.Semaphore(concurrency)
    cached: list[int] = []
    failures: list[str] = []

    async def one(client: httpx.AsyncClient, prompt: str) -> None:
        async with sem:
            r = await client.post(f"{base}/v1/completions", json={
                "model": "tiny-llama", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
            if r.status_code != 200:
                failures.append(f"{r.status_code}: {r.text[:200]}")
                return
            details = r.json()["usage"].get("prompt_tokens_details") or {}
            cached.append(details.get("cached_tokens") or 0)

    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=120) as client:
        await asyncio.gather(*(one(client, p) for _, p in prompts))
    return {"seconds": time.perf_counter() - t0, "completed": len(cached), "failures": failures,
            "cached_tokens_in_responses": sum(cached)}


def replica_stats(base: str, replicas: int, max_polls: int = 200) -> dict[str, dict]:
    """The last `/stats` of each replica (Serve routes each poll to one of them)."""
    seen: dict[str, dict] = {}
    for _ in range(max_polls):
        s = httpx.get(f"{base}/stats", timeout=30).json()
        seen[s["replica"]] = {k: s[k] for k in ("prefix_cache_queries", "prefix_cache_hits", "num_steps")}
        if len(seen) >= replicas:
            break
    return seen


def run_router(args: argparse.Namespace, router: str, base: str, prompts: list[tuple[int, str]]) -> dict:
    from ray import serve

    from deploy.app import build_app

    t0 = time.perf_counter()
    serve.run(build_app(app_args(args, router)), name="routing", route_prefix="/")
    started = time.perf_counter() - t0
    try:
        load = asyncio.run(send_all(base, prompts, args.concurrency, args.max_tokens))
        replicas = replica_stats(base, args.replicas)
    finally:
        serve.delete("routing")
    if len(replicas) < args.replicas:
        raise RuntimeError(f"{router}: only {len(replicas)} of {args.replicas} replicas answered /stats")
    queries = sum(r["prefix_cache_queries"] for r in replicas.values())
    hits = sum(r["prefix_cache_hits"] for r in replicas.values())
    return {"router": router, "start_s": started, **load, "replicas": replicas,
            "replicas_seen": len(replicas), "prefix_cache_queries": queries, "prefix_cache_hits": hits,
            "hit_rate": hits / queries if queries else None}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: argparse.Namespace) -> dict:
    import ray
    from ray import serve

    prompts = workload(args.num_prefixes, args.prefix_chars, args.num_requests, args.seed)
    port = _free_port()
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        runs = [run_router(args, router, f"http://127.0.0.1:{port}", prompts) for router in args.routers]
    finally:
        serve.shutdown()
        ray.shutdown()
    from vattn_ray.bench.provenance import git_state, versions

    return {"bench": "routing", "config": {k: v for k, v in vars(args).items() if k != "out"},
            "git": git_state(), "versions": versions(), "runs": runs,
            "hit_rate": {r["router"]: r["hit_rate"] for r in runs}}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m vattn_ray.bench routing", description=__doc__.split("\n")[0])
    p.add_argument("--routers", nargs="+", choices=ROUTERS, default=list(ROUTERS))
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--num-prefixes", type=int, default=4)
    p.add_argument("--prefix-chars", type=int, default=600)
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--page-bytes", type=int, default=4096)
    p.add_argument("--replica-cpus", type=float, default=0.5)
    p.add_argument("--worker-cpus", type=float, default=0.5)
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the JSON here (else stdout)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    text = json.dumps(result, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(json.dumps(result["hit_rate"]))
    return 0

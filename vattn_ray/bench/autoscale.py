"""Autoscaling under a load ramp: when the second replica serves, what it adds, and scale-down.

    python -m vattn_ray.bench autoscale --config deploy/config.autoscale.gpu.yaml \\
        --checkpoint /tmp/vattn-llama3-8b --phases low:2:30,high:24:120,idle:0:150 --out autoscale.json
    python -m vattn_ray.bench autoscale --url http://127.0.0.1:8000 --model tiny-llama ...   (a running app)

With --config, `serve run` of that config (its `model` set to --checkpoint when given) on a free
local Ray cluster, stopped at the end; with --url, an app already running. Then the phases in turn
(`name:rate:seconds`): open-loop Poisson arrivals of streaming token-id completions at `rate`
req/s (0: idle), --input-len in / --output-len out, ignore_eos, the same client as
`python -m vattn_ray.bench serving`. Meanwhile `GET /stats` is polled every --poll-interval s;
Serve routes each poll to one replica, and the answer names it (`replica`) with its running
requests and steps. From those samples (`analyze`):
  time_to_second_replica_s   from the first phase with a rate above the first one's to the
                             first sample in which a second replica is serving (running a
                             request, or its step count has grown since it was first seen)
  throughput_before / _after output tokens/s (a request's usage tokens spread over its streamed
                             chunks) and completed req/s in that
                             phase before and after the second replica served
  scale_down_s               from the start of the last idle phase to the last sample of any
                             replica but the first: with two replicas and polls routed between
                             them, a replica unseen for --gone-window s is gone (2^-n odds of
                             missing a live one over n polls)
The JSON (`--out`) is rewritten after every phase, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import socket
import sys
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import yaml

from vattn_ray.bench import servers
from vattn_ray.bench.provenance import versions
from vattn_ray.bench.serving import PromptSampler, RequestResult, poisson_arrivals, read_vocab, stream_completion

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Phase:
    name: str
    rate: float  # requests/s; 0 is idle
    seconds: float


def parse_phases(text: str) -> list[Phase]:
    """`name:rate:seconds,...` -> phases; names unique, rate >= 0, seconds > 0."""
    phases = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        fields = part.split(":")
        if len(fields) != 3:
            raise ValueError(f"phase {part!r}: write name:rate:seconds, e.g. high:16:60")
        name, rate, seconds = fields[0], float(fields[1]), float(fields[2])
        if not name or rate < 0 or not seconds > 0:
            raise ValueError(f"phase {part!r}: a name, a rate >= 0 and seconds > 0 are needed")
        if any(p.name == name for p in phases):
            raise ValueError(f"phase name {name!r} appears twice")
        phases.append(Phase(name, rate, seconds))
    if not phases:
        raise ValueError("no phases given")
    return phases


# ---- the analysis (pure: samples and requests in, figures out) ----------------------------------
def serving_start_times(samples: list[dict]) -> dict[str, float]:
    """Each replica's first sample time at which it was serving (running a request, or its steps
    grew since its first sample)."""
    first_steps: dict[str, int] = {}
    started: dict[str, float] = {}
    for s in sorted(samples, key=lambda s: s["t"]):
        rid = s.get("replica")
        if rid is None or rid in started:
            continue
        first_steps.setdefault(rid, s.get("num_steps") or 0)
        if (s.get("num_running") or 0) > 0 or (s.get("num_steps") or 0) > first_steps[rid]:
            started[rid] = s["t"]
    return started


def window_rates(requests: list[dict], t0: float, t1: float) -> dict[str, Any]:
    """Output tokens/s (each request's tokens spread over its chunks) and completed requests/s in the
    window [t0, t1)."""
    if not t1 > t0:
        return {"from_s": t0, "to_s": t1, "output_tokens_per_s": None, "completed_per_s": None}
    tokens = 0.0
    for r in requests:
        inside = sum(1 for c in r["chunk_s"] if t0 <= c < t1)
        # A busy server merges tokens into fewer chunks: share the request's token count (from the
        # stream's usage) over its chunks. One token per chunk when the usage never came.
        per_chunk = r["output_tokens"] / len(r["chunk_s"]) if r.get("output_tokens") and r["chunk_s"] else 1.0
        tokens += inside * per_chunk
    done = sum(1 for r in requests if r["end_s"] is not None and t0 <= r["end_s"] < t1)
    return {"from_s": t0, "to_s": t1, "output_tokens_per_s": tokens / (t1 - t0), "completed_per_s": done / (t1 - t0)}


def analyze(phases: list[dict], samples: list[dict], requests: list[dict], gone_window_s: float) -> dict[str, Any]:
    """Time to the second replica, throughput before / after it, scale-down (see the module doc).

    `phases`: [{"name", "rate", "start_s", "end_s"}]; `samples`: /stats polls {"t", "replica",
    "num_running", "num_steps"}; `requests`: {"phase", "sent_s", "chunk_s": [...], "end_s",
    "output_tokens"}.
    """
    out: dict[str, Any] = {"replicas_seen": sorted({s["replica"] for s in samples if s.get("replica")})}
    started = serving_start_times(samples)
    out["serving_since_s"] = started
    ordered = sorted(started.items(), key=lambda kv: kv[1])
    first = ordered[0][0] if ordered else None
    second_t = ordered[1][1] if len(ordered) > 1 else None
    ramp = next((p for p in phases[1:] if p["rate"] > phases[0]["rate"]), None)
    out["ramp_phase"] = ramp["name"] if ramp else None
    out["second_replica_serving_at_s"] = second_t
    out["time_to_second_replica_s"] = (second_t - ramp["start_s"]) if ramp and second_t is not None else None
    if ramp:
        split = second_t if second_t is not None and ramp["start_s"] <= second_t < ramp["end_s"] else ramp["end_s"]
        out["throughput_before"] = window_rates(requests, ramp["start_s"], split)
        out["throughput_after"] = window_rates(requests, split, ramp["end_s"])
    idle = next((p for p in reversed(phases) if p["rate"] == 0), None)
    out["idle_phase"] = idle["name"] if idle else None
    if idle and first is not None:
        # Serve may stop either replica: the survivor is whichever answers last, not the first one.
        answered = [s for s in samples if s.get("replica")]
        survivor = max(answered, key=lambda s: s["t"])["replica"] if answered else first
        others = [s["t"] for s in samples if s.get("replica") not in (None, survivor)]
        last_other = max(others, default=None)
        in_idle = [s["t"] for s in samples if idle["start_s"] <= s["t"] <= idle["end_s"]]
        gone = last_other is None or (in_idle and max(in_idle) - max(last_other, idle["start_s"]) >= gone_window_s)
        out["extra_replica_last_seen_s"] = last_other
        out["scaled_down"] = bool(gone)
        out["scale_down_s"] = (max(last_other - idle["start_s"], 0.0) if gone and last_other is not None else None)
    return out


# ---- the run -------------------------------------------------------------------------------------
async def _poll(session: aiohttp.ClientSession, url: str, t0: float, interval: float, samples: list[dict]) -> None:
    while True:
        try:
            async with session.get(f"{url}/stats") as resp:
                if resp.status == 200:
                    s = await resp.json()
                    samples.append({"t": time.perf_counter() - t0, "replica": s.get("replica"), "pid": s.get("pid"),
                                    "num_running": s.get("num_running"), "num_waiting": s.get("num_waiting"),
                                    "num_steps": s.get("num_steps")})
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            pass  # a replica going away mid-poll: the next poll reaches another one
        await asyncio.sleep(interval)


async def run_phases(args: argparse.Namespace, phases: list[Phase], save) -> dict[str, Any]:
    sampler = PromptSampler(args.vocab_size, args.excluded_ids)
    rng = random.Random(args.seed)
    samples: list[dict] = []
    done_phases: list[dict] = []
    requests: list[tuple[str, RequestResult]] = []
    tasks: list[asyncio.Task] = []
    url = f"{args.url}/v1/completions"
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=args.request_timeout, sock_connect=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        t0 = time.perf_counter()
        poller = asyncio.create_task(_poll(session, args.url, t0, args.poll_interval, samples))

        def report() -> dict[str, Any]:
            reqs = [{"phase": p, "sent_s": r.send_time - t0 if r.send_time else None,
                     "chunk_s": [round(c - t0, 4) for c in r.chunk_times],
                     "end_s": None if r.end_time is None else r.end_time - t0, "error": r.error,
                     "output_tokens": r.output_tokens}
                    for p, r in requests]
            return {"phases": done_phases, "samples": samples, "requests": reqs,
                    "analysis": analyze(done_phases, samples, reqs, args.gone_window)}

        try:
            for phase in phases:
                start = time.perf_counter() - t0
                logger.info("phase %s: %g req/s for %g s", phase.name, phase.rate, phase.seconds)
                offsets = poisson_arrivals(phase.rate, rng, duration_s=phase.seconds) if phase.rate > 0 else []
                for off in offsets:
                    delay = t0 + start + off - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    body = {"model": args.model, "prompt": sampler.sample(rng, args.input_len),
                            "max_tokens": args.output_len, "temperature": 0.0, "ignore_eos": True,
                            "stream": True, "stream_options": {"include_usage": True}}
                    result = RequestResult()
                    requests.append((phase.name, result))
                    tasks.append(asyncio.create_task(stream_completion(session, url, body, result)))
                rest = t0 + start + phase.seconds - time.perf_counter()
                if rest > 0:
                    await asyncio.sleep(rest)
                done_phases.append({"name": phase.name, "rate": phase.rate, "start_s": start,
                                    "end_s": time.perf_counter() - t0, "sent": len(offsets)})
                save(report())
        finally:
            pending = [t for t in tasks if not t.done()]
            if pending:  # an idle phase is normally last, so little is left; do not wait for more
                _, still = await asyncio.wait(pending, timeout=args.request_timeout)
                for t in still:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            poller.cancel()
            await asyncio.gather(poller, return_exceptions=True)
    return report()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m vattn_ray.bench autoscale", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", help="serve run this config (and stop it at the end)")
    where.add_argument("--url", help="an app already running (base URL, no /v1)")
    ap.add_argument("--checkpoint", help="--config: set the app's model to this checkpoint directory")
    ap.add_argument("--model", help="the served model name (default: the config's served_model_name)")
    ap.add_argument("--model-path", help="checkpoint whose vocabulary the prompts use (default: the app's model)")
    ap.add_argument("--phases", default="low:2:30,high:24:120,idle:0:150", help="name:rate:seconds,...")
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--poll-interval", type=float, default=0.25, help="seconds between GET /stats")
    ap.add_argument("--gone-window", type=float, default=10.0,
                    help="a replica unseen by polls for this long is counted as scaled down")
    ap.add_argument("--request-timeout", type=float, default=300.0)
    ap.add_argument("--start-timeout", type=float, default=300.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    try:
        args.phase_list = parse_phases(args.phases)
    except ValueError as exc:
        ap.error(str(exc))
    return args


def _app_config(args: argparse.Namespace) -> dict:
    with open(args.config) as f:
        config = yaml.safe_load(f)
    config["http_options"] = {**config.get("http_options", {}), "host": "127.0.0.1", "port": _free_port()}
    app = config["applications"][0]["args"]
    if args.checkpoint:
        app["model"] = args.checkpoint
    args.model = args.model or app.get("served_model_name") or app["model"]
    args.model_path = args.model_path or app["model"]
    return config


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    servers.install_sigterm_exit()
    data: dict[str, Any] = {"config": {k: v for k, v in vars(args).items() if k != "phase_list"},
                            "provenance": {"gpus": servers.gpu_names(), "versions": versions()}}

    def save(part: dict) -> None:
        data.update(part)
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out + ".tmp", "w") as f:
                json.dump(data, f, indent=2)
            os.replace(args.out + ".tmp", args.out)

    server = None
    try:
        if args.config:
            config = _app_config(args)
            data["app_config"] = config
            log_dir = os.path.dirname(os.path.abspath(args.out)) if args.out else "."
            path = os.path.join(log_dir, "autoscale.config.yaml")
            with open(path, "w") as f:
                yaml.safe_dump(config, f)
            server = servers.ServerProcess(servers.vattn_server_argv(path), os.path.join(log_dir, "autoscale.server.log"),
                                           env=servers.GPU_ENV).start()
            args.url = f"http://127.0.0.1:{config['http_options']['port']}"
            data["ready_s"] = server.wait_ready(args.url, args.model, args.start_timeout)
        elif not (args.model and args.model_path):
            raise SystemExit("--url needs --model and --model-path")
        args.vocab_size, args.excluded_ids = read_vocab(args.model_path)
        save(asyncio.run(run_phases(args, args.phase_list, save)))
    except servers.ServerFailed as exc:
        data["error"] = str(exc)
        save({})
        sys.stderr.write(f"autoscale benchmark failed: {exc}\n")
        return 1
    finally:
        if server is not None:
            data["stop"] = server.stop()
            save({})
    a = data.get("analysis", {})
    print(json.dumps({k: a.get(k) for k in ("replicas_seen", "time_to_second_replica_s", "throughput_before",
                                            "throughput_after", "scaled_down", "scale_down_s")}, indent=2))
    return 0

"""Serving side by side: this project's app and vLLM's OpenAI server under the same Poisson load.

    python -m vattn_ray.bench serving_compare --system vattn --out-dir out      # on 2 GPUs
    python -m vattn_ray.bench serving_compare --system vllm --out-dir out \\
        --peer-env /tmp/peer-site/peer_env.sh
    python -m vattn_ray.bench serving_compare --combine out/serving_vattn.json out/serving_vllm.json \\
        --out out/serving_compare.json [--plot out/serving_compare.png]

For each system of --system (vattn, vllm or both, in that order) on the same machine, one after
the other:
  vattn  `serve run` of --config (default deploy/config.gpu.yaml, TP=2) with its `model` set to
         --checkpoint, on 127.0.0.1:--port, `max_replicas` set to --max-replicas (1: two GPUs hold
         one TP=2 replica);
  vllm   `python -m vllm.entrypoints.openai.api_server` after sourcing --peer-env, with the same
         checkpoint, served name, dtype, tensor_parallel_size, max_model_len, max_num_seqs,
         max_num_batched_tokens and gpu_memory_utilization as the config's args, prefix caching off
         (this engine has none, and the prompts are random anyway);
then, once GET /v1/models lists the served name, `python -m vattn_ray.bench serving` at --rates
(--duration s each, --stop-when-saturated) with the same seed, so both servers get the very same
token-id prompts at the very same times (each rate's `load_sha256` says so), and the server is
stopped (Ctrl-C, then SIGKILL of its session) and its GPU memory awaited before the next one.
The checkpoint (Llama-3-8B-shaped, random bf16 weights) is built by the project's builder if missing.

Every step is bounded: --budget-s (default 540) for the whole command, so a device call of 10
minutes ends with its JSON written; a server not ready in --start-timeout s is recorded as an
error. Out: `<out-dir>/serving_<system>.json` (the serving report, written after every rate, plus
`server`: command, ready time, stop, versions, GPUs) and the server's log; with both systems,
`<out-dir>/serving_compare.json` (`--combine` writes the same from two reports made in two calls).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from typing import Any

import yaml

from vattn_ray.bench import servers
from vattn_ray.bench.provenance import ROOT, git_state

logger = logging.getLogger(__name__)
SYSTEMS = ("vattn", "vllm")
DEFAULT_CHECKPOINT = "/tmp/vattn-llama3-8b"


# ---- the two servers' command lines --------------------------------------------------------------
def app_args(config: dict) -> dict:
    """The `args` of the config's one application (the engine options both servers get)."""
    apps = config.get("applications") or []
    if len(apps) != 1:
        raise ValueError(f"the config must hold exactly one application, not {len(apps)}")
    return apps[0]["args"]


def vattn_config(config: dict, checkpoint: str, port: int, max_replicas: int) -> dict:
    """The shipped config pointed at `checkpoint`, on 127.0.0.1:`port`, with at most `max_replicas`."""
    config = json.loads(json.dumps(config))  # a deep copy of plain YAML data
    config["http_options"] = {**config.get("http_options", {}), "host": "127.0.0.1", "port": port}
    args = app_args(config)
    args["model"] = checkpoint
    args["placement_wait_s"] = 30  # the GPUs are here already: fail fast instead of waiting 10 min
    auto = args.get("autoscaling_config")
    if auto:
        auto["max_replicas"] = max_replicas
        auto["min_replicas"] = min(auto.get("min_replicas", 1), max_replicas)
    return config


def vllm_server_argv(args: dict, checkpoint: str, port: int, python: str = sys.executable) -> list[str]:
    """vLLM's OpenAI server with the engine limits of our config's `args` (vLLM's option names)."""
    argv = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", checkpoint,
            "--served-model-name", args["served_model_name"], "--host", "127.0.0.1", "--port", str(port),
            "--tensor-parallel-size", str(args.get("tensor_parallel_size", 1)), "--no-enable-prefix-caching",
            "--seed", "0"]
    for key in ("dtype", "max_model_len", "max_num_seqs", "max_num_batched_tokens", "gpu_memory_utilization"):
        if args.get(key) not in (None, "auto"):
            argv += ["--" + key.replace("_", "-"), str(args[key])]
    return argv


def bench_argv(args: argparse.Namespace, system: str, url: str, model: str, out: str) -> list[str]:
    """The serving benchmark's command: one client for both servers, only --url and --system differ."""
    return [sys.executable, "-m", "vattn_ray.bench", "serving", "--url", url, "--model", model,
            "--model-path", args.checkpoint, "--rates", args.rates, "--duration", str(args.duration),
            "--input-len", str(args.input_len), "--output-len", str(args.output_len),
            "--timeout", str(args.rate_timeout), "--seed", str(args.seed), "--system", system,
            "--slo-ttft-ms", str(args.slo_ttft_ms), "--slo-itl-ms", str(args.slo_itl_ms),
            "--stop-when-saturated", "--out", out]


# ---- one system ---------------------------------------------------------------------------------
def run_system(args: argparse.Namespace, system: str, deadline: float) -> dict:
    """Start `system`'s server, load it, stop it; its report (also written to the out dir)."""
    with open(args.config) as f:
        shipped = yaml.safe_load(f)
    cfg_args = app_args(shipped)
    model = cfg_args["served_model_name"]
    out = os.path.join(args.out_dir, f"serving_{system}.json")
    log = os.path.join(args.out_dir, f"serving_{system}.server.log")
    env = dict(servers.GPU_ENV)
    if system == "vattn":
        config_path = os.path.join(args.out_dir, "config.serving.yaml")
        with open(config_path, "w") as f:
            yaml.safe_dump(vattn_config(shipped, args.checkpoint, args.port, args.max_replicas), f)
        argv = servers.vattn_server_argv(config_path)
    else:
        argv = servers.with_env_script(vllm_server_argv(cfg_args, args.checkpoint, args.port), args.peer_env)
    url = f"http://127.0.0.1:{args.port}"
    info: dict[str, Any] = {"system": system, "command": argv, "gpus_before": servers.gpu_memory_used_mib()}
    if os.path.exists(out):
        os.remove(out)
    server = servers.ServerProcess(argv, log, env=env, cwd=ROOT)
    try:
        server.start()
        info["ready_s"] = server.wait_ready(url, model, min(args.start_timeout, deadline - time.monotonic() - 60))
        logger.info("%s ready after %.1f s", system, info["ready_s"])
        if system == "vllm":
            info["vllm_version"] = (servers.http_get_json(f"{url}/version") or {}).get("version")
        bench_timeout = deadline - time.monotonic() - 45  # leave time to stop the server
        try:
            rc = subprocess.run(bench_argv(args, system, url, model, out), cwd=ROOT, timeout=bench_timeout).returncode
            info["bench_returncode"] = rc
        except subprocess.TimeoutExpired:  # the report holds every rate finished before this
            info["error"] = f"the load ran past the budget ({bench_timeout:.0f} s) and was stopped"
    except servers.ServerFailed as exc:
        info["error"] = str(exc)
    finally:
        info["stop"] = server.stop()
        info["gpus_after_stop"] = servers.wait_gpus_free()
    report = _read(out) or {"config": {"system": system}, "results": []}
    report["server"] = info
    report["provenance"] = {"git": git_state(), "gpus": servers.gpu_names()}
    _write(out, report)
    return report


# ---- both side by side --------------------------------------------------------------------------
QUANTILES = 200  # a CDF drawn from 201 points is smooth, and a rate's entry stays a few kB


def quantiles_ms(seconds: list[float | None], points: int = QUANTILES) -> list[float]:
    """`points` + 1 evenly spaced quantiles (levels 0, 1/points, ..., 1; nearest rank) of the
    samples, in ms; empty without samples."""
    xs = sorted(1e3 * s for s in seconds if s is not None)
    if not xs:
        return []
    return [round(xs[round(i * (len(xs) - 1) / points)], 3) for i in range(points + 1)]


def _rate_entry(r: dict) -> dict:
    entry = {k: r.get(k) for k in ("rate", "sent", "completed", "failed", "request_throughput", "output_tokens_per_s",
                                   "ttft_ms", "itl_ms", "tpot_ms", "e2e_ms", "load_sha256")}
    entry["ttft_ms_quantiles"] = quantiles_ms([q.get("ttft_s") for q in r.get("requests", [])])
    entry["itl_ms_quantiles"] = quantiles_ms(r.get("itl_s", []))
    return entry


def combine(reports: list[dict]) -> dict:
    """One comparison of serving reports of different systems (each its own `serving` run).

    `same_load` is true when every rate both measured had the same load digest (same prompts,
    lengths and arrival times); SLO ratios are only meaningful then. Each rate keeps its TTFT and
    inter-token latency distributions as QUANTILES + 1 evenly spaced quantiles in ms
    (`ttft_ms_quantiles`, `itl_ms_quantiles`, levels 0 to 1), enough to draw their CDFs without
    every sample (the per-system reports hold those).
    """
    systems = {}
    for rep in reports:
        name = rep["config"].get("system") or rep.get("server", {}).get("system") or "unnamed"
        if name in systems:
            raise ValueError(f"two reports of system {name!r}")
        systems[name] = {
            "slo": rep.get("slo"), "error": rep.get("server", {}).get("error"),
            "ready_s": rep.get("server", {}).get("ready_s"),
            "rates": [_rate_entry(r) for r in rep.get("results", [])]}
    digests = [{r["rate"]: r["load_sha256"] for r in s["rates"]} for s in systems.values()]
    common = set.intersection(*(set(d) for d in digests)) if digests else set()
    same = bool(common) and all(len({d[rate] for d in digests}) == 1 for rate in common)
    out: dict[str, Any] = {"systems": systems, "rates_in_common": sorted(common), "same_load": same,
                           "config": {k: v for k, v in reports[0]["config"].items() if k != "system"} if reports else {}}
    best = {n: (s["slo"] or {}).get("highest_rate_meeting_slo") for n, s in systems.items()}
    if "vattn" in best and "vllm" in best:
        a, b = best["vattn"], best["vllm"]
        out["slo_rate_vattn_over_vllm"] = a / b if a is not None and b else None
        out["highest_rate_meeting_slo"] = best
    return out


def render_comparison(cmp: dict) -> str:
    lines = [f"same load on every system: {cmp['same_load']} (rates {cmp['rates_in_common']})", "",
             "| system | rate | ok / sent | req/s | out tok/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | E2E p99 | SLO |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]

    def f(x, nd=1):
        return "-" if x is None else f"{x:.{nd}f}"

    for name, s in cmp["systems"].items():
        verdict = {v["rate"]: v["meets"] for v in (s["slo"] or {}).get("rates", [])}
        for r in s["rates"]:
            lines.append(f"| {name} | {r['rate']:g} | {r['completed']} / {r['sent']} | {f(r['request_throughput'], 2)} "
                         f"| {f(r['output_tokens_per_s'], 0)} | {f(r['ttft_ms']['p50'])} | {f(r['ttft_ms']['p99'])} "
                         f"| {f(r['itl_ms']['p50'])} | {f(r['itl_ms']['p99'])} | {f(r['e2e_ms']['p99'], 0)} "
                         f"| {'meets' if verdict.get(r['rate']) else 'misses'} |")
        if s["error"]:
            lines.append(f"| {name} | error: {s['error'][:120]} |")
    for name, s in cmp["systems"].items():
        best = (s["slo"] or {}).get("highest_rate_meeting_slo")
        lines.append(f"\n{name}: highest rate meeting the SLO: {'none' if best is None else f'{best:g} req/s'}")
    return "\n".join(lines)


# ---- driver -------------------------------------------------------------------------------------
def _read(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write(path: str, data: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m vattn_ray.bench serving_compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--system", choices=("vattn", "vllm", "both"), default="both")
    ap.add_argument("--out-dir", default="serving_compare")
    ap.add_argument("--combine", nargs="+", metavar="REPORT", help="only combine these serving reports")
    ap.add_argument("--out", help="--combine: the comparison JSON (default <out-dir>/serving_compare.json)")
    ap.add_argument("--plot", help="also draw the comparison into this file")
    ap.add_argument("--config", default=os.path.join(ROOT, "deploy", "config.gpu.yaml"))
    ap.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="built here (8B shape) if missing")
    ap.add_argument("--peer-env", default=None, help="script to source before starting vLLM's server")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--max-replicas", type=int, default=1)
    ap.add_argument("--rates", default="4,16,32,48,64")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of arrivals per rate")
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--rate-timeout", type=float, default=60.0, help="drain time after a rate's last arrival")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--slo-ttft-ms", type=float, default=1000.0)
    ap.add_argument("--slo-itl-ms", type=float, default=100.0)
    ap.add_argument("--start-timeout", type=float, default=300.0, help="seconds for a server to get ready")
    ap.add_argument("--budget-s", type=float, default=540.0, help="wall seconds for the whole command")
    return ap.parse_args(argv)


def _ensure_checkpoint(path: str) -> None:
    if os.path.isfile(os.path.join(path, "tokenizer.json")):  # the builder writes it last
        return
    from vattn_ray.model.builder import build_random_checkpoint

    logger.info("building the 8B-shaped checkpoint in %s", path)
    build_random_checkpoint(path, "llama", preset="llama-3-8b", dtype="bfloat16", seed=0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.combine:
        reports = [_read(p) for p in args.combine]
        missing = [p for p, r in zip(args.combine, reports) if r is None]
        if missing:
            sys.stderr.write(f"cannot read {missing}\n")
            return 2
        cmp = combine(reports)
        _write(args.out or os.path.join(args.out_dir, "serving_compare.json"), cmp)
        _draw(cmp, args.plot)
        print(render_comparison(cmp))
        return 0
    servers.install_sigterm_exit()
    deadline = time.monotonic() + args.budget_s
    os.makedirs(args.out_dir, exist_ok=True)
    if args.peer_env is None and args.system in ("vllm", "both"):
        logger.warning("no --peer-env: vLLM's server runs on this Python's packages")
    _ensure_checkpoint(args.checkpoint)
    reports = []
    for system in SYSTEMS if args.system == "both" else (args.system,):
        if deadline - time.monotonic() < 120:
            logger.error("no budget left for %s", system)
            break
        reports.append(run_system(args, system, deadline))
    if len(reports) == 2:
        cmp = combine(reports)
        _write(os.path.join(args.out_dir, "serving_compare.json"), cmp)
        _draw(cmp, args.plot)
        print(render_comparison(cmp))
    failed = [r["server"]["system"] for r in reports if r["server"].get("error")]
    return 1 if failed or not reports else 0


def _draw(cmp: dict, path: str | None) -> None:
    if path:
        from vattn_ray.bench.plots import plot_serving_comparison

        plot_serving_comparison(cmp, path)


if __name__ == "__main__":
    raise SystemExit(main())

"""The vLLM peer: benchmark jobs through stock vLLM's offline `LLM`, in a process of its own.

    python vattn_ray/bench/vllm_peer.py --jobs jobs.json --out result.json --model DIR \
        [--dtype bfloat16 --tensor-parallel-size 1 --max-num-seqs 256 --max-model-len 8193 \
         --max-num-batched-tokens 8192 --gpu-memory-utilization 0.9 --seed 0]

`python -m vattn_ray.bench throughput --systems vattn,vllm` starts it through `launch` with the same
Python, after sourcing `--peer-env` (the script vLLM's install wrote) in the child only, so our own
engine never runs on the peer's packages. It imports nothing of this project: it runs wherever vLLM
does. Its GPU memory is gone when it exits.

In: `jobs.json` = {"sampling": {"temperature": 0.0, "ignore_eos": true}, "jobs": [Job.to_dict()...]}
(token-id prompts and per-request max_tokens; see vattn_ray/bench/workloads.py for the kinds).
Out (rewritten after every job, so a run cut short keeps what it measured):
  {"available": false, "reason": "...", "received": {...}}     vLLM cannot be imported
  {"available": true, "received": {job name: digest()}, "versions": {...}, "engine_args": {...}, "engine_start_s": s,
   "jobs": [{"name", "kind", ...measurements} or {"name", "kind", "error"}], "complete": bool}
Measurements: warmup {"seconds"}; throughput {"seconds", "requests", "prompt_tokens",
"output_tokens"} of one timed `generate`; decode_latency {"seconds_short" (max_tokens=lead_steps+1),
"seconds_long" (max_tokens=lead_steps+steps+1), "output_tokens_short", "output_tokens_long"};
schedule (jobs that also hold "after" and "arrival"): the per-request times of
vattn_ray/bench/step_driver.py's loop over the engine's own `add_request` / `step`.
Prefix caching is off unless --enable-prefix-caching: the decode-latency method sends the same
prompts twice, and a cache hit would skip the second prefill (the project's engine runs with it
off too: bench/vattn_system.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any

# argparse dest -> vLLM `LLM(...)` keyword; the same names as vLLM's EngineArgs.
ENGINE_OPTIONS = {"dtype": str, "tensor_parallel_size": int, "max_num_seqs": int, "max_model_len": int,
                  "max_num_batched_tokens": int, "gpu_memory_utilization": float, "seed": int}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vllm_peer.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", required=True, help="JSON file of jobs (token-id prompts, max_tokens)")
    p.add_argument("--out", required=True, help="result JSON, rewritten after every job")
    p.add_argument("--model", required=True, help="Hugging Face checkpoint directory")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--enable-prefix-caching", action="store_true")
    return p.parse_args(argv)


def engine_argv(engine: dict) -> list[str]:
    """`--option value` for each engine option set in `engine` (keys as in ENGINE_OPTIONS)."""
    argv = []
    for key in ENGINE_OPTIONS:
        if engine.get(key) is not None:
            argv += ["--" + key.replace("_", "-"), str(engine[key])]
    if engine.get("enable_prefix_caching"):
        argv.append("--enable-prefix-caching")
    return argv


def digest(prompts: list[list[int]], max_tokens: list[int]) -> str:
    """sha256 of a job's token ids and lengths: both sides compute it to show they ran the same job."""
    return hashlib.sha256(json.dumps([prompts, max_tokens], separators=(",", ":")).encode()).hexdigest()


def _write(path: str, result: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, path)  # a reader never sees half a file


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with open(args.jobs) as f:
        spec = json.load(f)
    received = {j["name"]: digest(j["prompts"], j["max_tokens"]) for j in spec["jobs"]}
    try:
        import vllm
        from vllm import LLM, SamplingParams
    except Exception as exc:  # noqa: BLE001 - any failure to import means "not available here"
        _write(args.out, {"available": False, "reason": f"vllm is not importable: {type(exc).__name__}: {exc}",
                          "received": received})
        return 0
    import torch
    import transformers

    engine = {k: getattr(args, k) for k in ENGINE_OPTIONS}
    caching = bool(args.enable_prefix_caching)
    result: dict = {"available": True, "engine_args": {"model": args.model, **engine, "enable_prefix_caching": caching},
                    "versions": {"vllm": vllm.__version__, "torch": torch.__version__, "cuda": torch.version.cuda,
                                 "transformers": transformers.__version__, "python": sys.version.split()[0]},
                    "received": received, "jobs": [], "complete": False}
    if args.tensor_parallel_size > 1:
        # vLLM's own multiprocessing workers on this machine's GPUs, never a Ray cluster it finds.
        engine["distributed_executor_backend"] = "mp"
        result["engine_args"]["distributed_executor_backend"] = "mp"
    t0 = time.perf_counter()
    try:
        llm = LLM(model=args.model, tokenizer=args.model, enable_prefix_caching=caching, **engine)
    except Exception as exc:  # noqa: BLE001 - reported in the result, not a crash without one
        traceback.print_exc()
        result["error"] = f"engine start failed: {type(exc).__name__}: {exc}"
        _write(args.out, result)
        return 1
    result["engine_start_s"] = time.perf_counter() - t0
    result["parallel"] = parallel_report(llm, torch)
    _write(args.out, result)
    sampling = spec.get("sampling", {})

    def params(n: int):
        return SamplingParams(temperature=float(sampling.get("temperature", 0.0)), max_tokens=n,
                              ignore_eos=bool(sampling.get("ignore_eos", True)))

    def timed(prompts, max_tokens) -> tuple[float, int]:
        inputs, sampling_params = [{"prompt_token_ids": p} for p in prompts], [params(n) for n in max_tokens]
        t = time.perf_counter()
        outs = llm.generate(inputs, sampling_params, use_tqdm=False)
        return time.perf_counter() - t, sum(len(o.outputs[0].token_ids) for o in outs)

    for job in spec["jobs"]:
        entry = {"name": job["name"], "kind": job["kind"]}
        try:
            entry.update(run_schedule(job, llm, sampling) if "after" in job else run_job(job, timed))
        except Exception as exc:  # noqa: BLE001 - later jobs would run on an engine in an unknown state
            traceback.print_exc()
            entry["error"] = f"{type(exc).__name__}: {exc}"
            result["jobs"].append(entry)
            break
        result["jobs"].append(entry)
        print(f"vllm-peer: {json.dumps(entry)}", flush=True)
        _write(args.out, result)
    result["complete"] = (len(result["jobs"]) == len(spec["jobs"])
                          and not any("error" in j for j in result["jobs"]))
    _write(args.out, result)
    return 0 if result["complete"] else 1


def parallel_report(llm, torch) -> dict:
    """What vLLM itself says it runs on (not what was asked): TP size, workers' backend, GPUs seen."""
    out = {"cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
           "device_count": torch.cuda.device_count() if torch.cuda.is_available() else 0}
    try:
        pc = llm.llm_engine.vllm_config.parallel_config
        out.update(tensor_parallel_size=pc.tensor_parallel_size, world_size=pc.world_size,
                   distributed_executor_backend=str(pc.distributed_executor_backend))
    except AttributeError as exc:  # another vLLM layout: say so instead of guessing
        out["error"] = f"parallel config not found: {exc}"
    return out


def run_job(job: dict, timed) -> dict:
    """The measurement of one job; `timed(prompts, max_tokens)` -> (seconds, output tokens)."""
    prompts = job["prompts"]
    if job["kind"] == "decode_latency":
        lead = job["lead_steps"]
        t_short, n_short = timed(prompts, [lead + 1] * len(prompts))
        t_long, n_long = timed(prompts, [lead + job["steps"] + 1] * len(prompts))
        return {"seconds_short": t_short, "seconds_long": t_long, "output_tokens_short": n_short,
                "output_tokens_long": n_long}
    seconds, out_tokens = timed(prompts, job["max_tokens"])
    if job["kind"] == "warmup":
        return {"seconds": seconds}
    return {"seconds": seconds, "requests": len(prompts), "prompt_tokens": sum(len(p) for p in prompts),
            "output_tokens": out_tokens}


def run_schedule(job: dict, llm, sampling: dict) -> dict:
    """A scheduled job through vLLM's own engine loop (`LLMEngine.add_request` / `step`), streaming
    deltas so every request's first token is seen when its step returns (`LLM.generate` asks for
    final outputs only)."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    driver = _load_sibling("step_driver")
    engine = llm.llm_engine

    class VllmStepper:
        def add(self, request_id: str, prompt: list[int], max_tokens: int) -> None:
            params = SamplingParams(temperature=float(sampling.get("temperature", 0.0)), max_tokens=max_tokens,
                                    ignore_eos=bool(sampling.get("ignore_eos", True)),
                                    output_kind=RequestOutputKind.DELTA)
            engine.add_request(request_id, {"prompt_token_ids": prompt}, params)

        def step(self):
            return [(o.request_id, list(o.outputs[0].token_ids) if o.outputs else [], o.finished,
                     getattr(o, "num_cached_tokens", None)) for o in engine.step()]

        def busy(self) -> bool:
            return engine.has_unfinished_requests()

    return driver.run(VllmStepper(), job["prompts"], job["max_tokens"], job["after"], job["arrival"],
                      name=job["name"])


def _load_sibling(name: str):
    """A module of this directory by file path: the child must not import the project's package."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                                     name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- the parent's side ------------------------------------------------------------------------
def launch(jobs: list[dict], engine: dict, out_path: str, *, peer_env: str | None = None,
           sampling: dict | None = None, timeout_s: float | None = None) -> dict:
    """Run this script on `jobs` in a child process and return its result JSON.

    `engine` holds "model" and the ENGINE_OPTIONS. The child gets its own process group, which is
    killed once the script has exited (or timed out), so vLLM's engine processes cannot outlive it
    and hold GPU memory the next system needs (a group, not a session: whoever stops this process's
    session stops the peer too). A child that dies without a result is reported as
    an error, never as unavailable.
    """
    if peer_env is not None and not os.path.isfile(peer_env):
        return {"available": True, "error": f"--peer-env {peer_env!r} does not exist; install the peer first"}
    with tempfile.TemporaryDirectory(prefix="vllm-peer-") as tmp:
        jobs_path = os.path.join(tmp, "jobs.json")
        with open(jobs_path, "w") as f:
            json.dump({"sampling": sampling or {"temperature": 0.0, "ignore_eos": True}, "jobs": jobs}, f)
        if os.path.exists(out_path):
            os.remove(out_path)
        cmd = [sys.executable, os.path.abspath(__file__), "--jobs", jobs_path, "--out", out_path,
               "--model", engine["model"], *engine_argv(engine)]
        if peer_env is not None:
            cmd = ["bash", "-c", 'source "$0" && exec "$@"', peer_env, *cmd]
        proc = subprocess.Popen(cmd, process_group=0)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            _kill_group(proc.pid)
            proc.wait()
    result: dict = {}
    if os.path.isfile(out_path):
        with open(out_path) as f:
            result = json.load(f)
    if rc is None:
        result.setdefault("error", f"the vLLM peer ran past {timeout_s} s and was stopped")
    elif rc != 0 and "error" not in result and not any("error" in j for j in result.get("jobs", [])):
        result["error"] = f"the vLLM peer exited with status {rc} (its log is above)"
    return result


def engine_options(args, dtype: str, **extra) -> dict:
    """The peer's engine settings from a benchmark's arguments (the same limits as our engine's)."""
    return {"model": args.model, "dtype": dtype, "tensor_parallel_size": args.tp,
            "max_num_seqs": args.max_num_seqs, "max_model_len": args.max_model_len,
            "max_num_batched_tokens": args.max_num_batched_tokens,
            "gpu_memory_utilization": args.gpu_memory_utilization, "seed": args.seed, **extra}


def launch_beside(report_out: str | None, jobs: list[dict], engine: dict, **kwargs) -> dict:
    """`launch`, writing the peer's own result beside the report (`<report>.vllm-peer.json`, so a run
    cut short keeps what the peer measured), or to a temporary file when there is no report."""
    if report_out:
        return launch(jobs, engine, os.path.splitext(report_out)[0] + ".vllm-peer.json", **kwargs)
    with tempfile.TemporaryDirectory() as tmp:
        return launch(jobs, engine, os.path.join(tmp, "vllm.json"), **kwargs)


def measurements(res: dict, jobs: list) -> list[tuple[Any, dict]]:
    """(job, measurement) for each of `jobs` (objects with `name` and `summary()`) from the peer's
    result: "unavailable" where vLLM could not be imported, "error" where the job did not run,
    and whether the peer's digest of the prompts it read equals ours (`same_job_sha256`: proof it
    ran the very same job)."""
    measured = {j["name"]: j for j in res.get("jobs", [])}
    received = res.get("received", {})
    out = []
    for job in jobs:
        if res.get("available") is False:
            meas = {"unavailable": res["reason"]}
        else:
            meas = measured.get(job.name) or {"error": res.get("error") or "not run: an earlier job failed"}
            meas = {k: v for k, v in meas.items() if k not in ("name", "kind")}
        meas["same_job_sha256"] = received.get(job.name) == job.summary()["sha256"]
        out.append((job, meas))
    return out


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


if __name__ == "__main__":
    sys.exit(main())

"""Servers that benchmarks start and stop: `serve run <config>` of this project, or vLLM's OpenAI
server, each in a session of its own so that stopping it leaves nothing behind on the GPUs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

# Multicast (NVLS) stays off on the project's GPU hosts; Ray's usage report needs a network.
GPU_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1",
           "RAY_USAGE_STATS_ENABLED": "0"}


class ServerFailed(RuntimeError):
    """The server exited or did not answer in time; the message ends with its log's tail."""


def serve_cli() -> list[str]:
    """The `serve` command of this Python (its console script, else the module)."""
    script = Path(sys.executable).with_name("serve")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "ray.serve.scripts"]


def vattn_server_argv(config_path: str) -> list[str]:
    """`serve run` on a fresh local Ray cluster of its own (never one it happens to find)."""
    return [*serve_cli(), "run", "--address", "local", config_path]


def with_env_script(argv: list[str], env_script: str | None) -> list[str]:
    """`argv` run in a shell that has sourced `env_script` first (e.g. the vLLM peer's env)."""
    if env_script is None:
        return argv
    return ["bash", "-c", 'source "$0" && exec "$@"', env_script, *argv]


def http_get_json(url: str, timeout: float = 5.0) -> object | None:
    """The JSON body of a 200 answer to GET `url`, else None (refused, not ready, not JSON)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return json.loads(resp.read()) if resp.status == 200 else None
    except (urllib.error.URLError, OSError, ValueError):
        return None


class ServerProcess:
    """One server process in its own session; `stop()` ends the whole session.

    Use as a context manager: the server is stopped however the block ends.
    """

    def __init__(self, argv: list[str], log_path: str, env: dict[str, str] | None = None,
                 cwd: str | None = None) -> None:
        self.argv, self.log_path, self.cwd = argv, log_path, cwd
        self.env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        self.env.update(env or {})
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0

    def start(self) -> "ServerProcess":
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                         cwd=self.cwd, start_new_session=True)
        self.started_at = time.monotonic()
        return self

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def wait_ready(self, base_url: str, model: str, timeout_s: float) -> float:
        """Seconds from start until GET /v1/models lists `model`; raises ServerFailed."""
        deadline = self.started_at + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerFailed(f"server exited with status {self.proc.returncode} before it was ready; "
                                   f"log tail:\n{self.log_tail()}")
            models = http_get_json(f"{base_url}/v1/models")
            if isinstance(models, dict) and any(m.get("id") == model for m in models.get("data", [])):
                return time.monotonic() - self.started_at
            time.sleep(1.0)
        raise ServerFailed(f"server not ready (GET /v1/models listing {model!r}) after {timeout_s:.0f} s; "
                           f"log tail:\n{self.log_tail()}")

    def stop(self, grace_s: float = 60.0) -> dict:
        """Ctrl-C (what `serve run` and vLLM's server shut down cleanly on), then SIGKILL the session."""
        if self.proc is None:
            return {"stopped": "never started"}
        t0 = time.monotonic()
        how = "exited by itself"
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGINT)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=grace_s)
                how = "SIGINT"
            except subprocess.TimeoutExpired:
                how = f"SIGKILL after {grace_s:.0f} s"
        try:  # children that outlived the leader (Ray's processes, vLLM's workers) go too
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        return {"stopped": how, "stop_s": time.monotonic() - t0, "returncode": self.proc.returncode}

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def gpu_memory_used_mib() -> list[int] | None:
    """Memory in use on each GPU (nvidia-smi), or None where there is no nvidia-smi."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return [int(x) for x in out.split() if x.strip().isdigit()]


def gpu_names() -> list[str] | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return [line.strip() for line in out.splitlines() if line.strip()]


def wait_gpus_free(limit_mib: int = 2048, timeout_s: float = 90.0) -> list[int] | None:
    """Wait until every GPU uses less than `limit_mib` (the last server's memory is gone)."""
    deadline = time.monotonic() + timeout_s
    used = gpu_memory_used_mib()
    while used and max(used) >= limit_mib and time.monotonic() < deadline:
        time.sleep(1.0)
        used = gpu_memory_used_mib()
    return used


def install_sigterm_exit() -> None:
    """Turn SIGTERM (e.g. from `timeout`) into SystemExit, so `finally` blocks stop the servers."""
    def _exit(signum, frame):  # noqa: ARG001
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)

"""`serve run <config>` in a subprocess for end-to-end tests that need their own environment (a
Ray temp dir to find Ray's metrics exporter, a Hugging Face cache): the same start, health wait,
Ctrl-C shutdown and leftover-process check as test_serve_e2e's fixture. The helpers live here,
so a test that needs no OpenAI client (the GPU ones) can import them."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

logger = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 150


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session_processes(sid: int) -> list[str]:
    """Live processes of the session the `serve run` subprocess leads (Ray's daemons included)."""
    out = subprocess.run(["ps", "-eo", "pid=,sid=,stat=,args="], capture_output=True, text=True).stdout
    procs = []
    for line in out.splitlines():
        pid, psid, stat, args = line.split(None, 3)
        if int(psid) == sid and not stat.startswith("Z"):
            procs.append(f"{pid} {args[:120]}")
    return procs


def _wait_healthy(base: str, proc: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"serve run exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    pytest.fail(f"no healthy server within {START_TIMEOUT_S}s:\n{log_path.read_text()[-4000:]}")


def _stop(proc: subprocess.Popen) -> list[str]:
    """Ctrl-C `serve run` (Serve shuts down, then its Ray cluster); the processes still left."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            pass
    deadline = time.monotonic() + 30
    while _session_processes(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    return _session_processes(proc.pid)


def wait_until(cond, what: str, timeout_s: float) -> None:
    """Poll `cond` every 10 ms; fail the test after `timeout_s` naming `what`."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def checked_stats(base: str, timeout_s: float) -> dict:
    """GET /stats with the integrity check (pages, weights, schedulers against shards); asserts it is ok."""
    stats = httpx.get(f"{base}/stats", params={"check_integrity": True}, timeout=timeout_s).json()
    assert stats["integrity"] == "ok", stats["integrity"]
    return stats


@contextlib.contextmanager
def serve_run(config: dict, tmp: Path, env: dict[str, str] | None = None):
    """Serve `config` (its HTTP port replaced by a free one) on a fresh local Ray cluster; yields
    (base URL, the `serve run` process). `env` adds to the environment of `serve run` and every
    process it starts."""
    config = {**config, "http_options": {**config.get("http_options", {}), "port": _free_port()}}
    config_path = tmp / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    log_path = tmp / "serve.log"
    full_env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    full_env.update({"RAY_USAGE_STATS_ENABLED": "0", **(env or {})})
    serve_cli = Path(sys.executable).with_name("serve")
    # Ray installed as a package folder (pip --target, as on the GPU machines) has no `serve`
    # script: run its entry point with this interpreter instead.
    cli = ([str(serve_cli)] if serve_cli.exists()
           else [sys.executable, "-c", "import sys; from ray.serve.scripts import cli; sys.argv[0] = 'serve'; cli()"])
    with open(log_path, "w") as log:
        proc = subprocess.Popen([*cli, "run", "--address", "local", str(config_path)], cwd=ROOT,
                                env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{config['http_options']['port']}"
    try:
        _wait_healthy(base, proc, log_path)
        yield base, proc
    finally:
        leftover = _stop(proc)
        logger.info("serve run log tail:\n%s", log_path.read_text()[-3000:])
        if leftover:
            os.killpg(proc.pid, signal.SIGKILL)  # only the session we started
            raise AssertionError(f"processes left after shutdown (killed): {leftover}")

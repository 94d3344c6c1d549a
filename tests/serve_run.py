"""`serve run <config>` in a subprocess for end-to-end tests that need their own environment (a
Ray temp dir to find Ray's metrics exporter, a Hugging Face cache): the same start, health wait,
Ctrl-C shutdown and leftover-process check as test_serve_e2e's fixture."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import yaml
from test_serve_e2e import ROOT, _free_port, _stop, _wait_healthy

logger = logging.getLogger(__name__)


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
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(serve_cli), "run", "--address", "local", str(config_path)], cwd=ROOT,
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

"""The serving comparison's pieces on CPU: the two servers' command lines from one config, the
server process lifecycle (ready check, a stop that ends its whole session), and combining two
systems' reports of the same load (with a vLLM-shaped fake server standing in for both)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_bench_slo import MODEL, FakeOpenAIServer

from vattn_ray.bench import serving, serving_compare, servers
from vattn_ray.bench.__main__ import main as bench_main

ROOT = Path(__file__).resolve().parents[1]


def _gpu_config() -> dict:
    return yaml.safe_load((ROOT / "deploy" / "config.gpu.yaml").read_text())


def test_vllm_gets_the_engine_limits_of_our_config():
    args = serving_compare.app_args(_gpu_config())
    argv = serving_compare.vllm_server_argv(args, "/tmp/ckpt", 8123, python="py")
    assert argv[:3] == ["py", "-m", "vllm.entrypoints.openai.api_server"]
    opts = {a: b for a, b in zip(argv[3:], argv[4:]) if a.startswith("--")}
    assert opts["--model"] == "/tmp/ckpt" and opts["--served-model-name"] == args["served_model_name"]
    assert opts["--tensor-parallel-size"] == str(args["tensor_parallel_size"]) == "2"
    for key in ("dtype", "max_model_len", "max_num_seqs", "max_num_batched_tokens", "gpu_memory_utilization"):
        assert opts["--" + key.replace("_", "-")] == str(args[key])
    assert opts["--port"] == "8123" and opts["--host"] == "127.0.0.1"
    assert "--no-enable-prefix-caching" in argv
    wrapped = servers.with_env_script(argv, "/tmp/peer-site/peer_env.sh")
    assert wrapped[:4] == ["bash", "-c", 'source "$0" && exec "$@"', "/tmp/peer-site/peer_env.sh"]
    assert wrapped[4:] == argv


def test_our_config_is_pointed_at_the_checkpoint_and_pinned_to_the_gpus():
    shipped = _gpu_config()
    cfg = serving_compare.vattn_config(shipped, "/tmp/ckpt", 8123, max_replicas=1)
    args = serving_compare.app_args(cfg)
    assert args["model"] == "/tmp/ckpt" and args["placement_wait_s"] == 30
    assert args["autoscaling_config"]["max_replicas"] == 1 and args["autoscaling_config"]["min_replicas"] == 1
    assert cfg["http_options"] == {"host": "127.0.0.1", "port": 8123}
    assert serving_compare.app_args(shipped)["model"] != "/tmp/ckpt"  # the shipped dict is untouched
    assert args["tensor_parallel_size"] == 2


SERVER = """
import http.server, json, subprocess, sys
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
open(sys.argv[2], "w").write(str(child.pid))
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"object": "list", "data": [{"id": "m"}]}).encode()
        self.send_response(200 if self.path == "/v1/models" else 404)
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def test_server_process_is_ready_then_stopped_with_its_children(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    child_pid_file = tmp_path / "child.pid"
    proc = servers.ServerProcess([sys.executable, "-c", SERVER, str(port), str(child_pid_file)],
                                 str(tmp_path / "server.log"))
    with proc:
        ready = proc.wait_ready(f"http://127.0.0.1:{port}", "m", timeout_s=30)
        assert 0 < ready < 30
        with pytest.raises(servers.ServerFailed, match="not ready"):
            proc.wait_ready(f"http://127.0.0.1:{port}", "other-model", timeout_s=ready + 1.5)
        child = int(child_pid_file.read_text())
        os.kill(child, 0)  # alive while the server runs
    assert proc.proc.returncode is not None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the session's SIGKILL reached the grandchild too
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the server's child outlived stop()")


def test_a_server_that_exits_early_is_reported_with_its_log(tmp_path):
    proc = servers.ServerProcess([sys.executable, "-c", "print('no GPUs here'); raise SystemExit(3)"],
                                 str(tmp_path / "server.log"))
    with proc, pytest.raises(servers.ServerFailed, match=r"status 3(.|\n)*no GPUs here"):
        proc.wait_ready("http://127.0.0.1:9", "m", timeout_s=30)


def _report(url: str, path: Path, system: str, seed: int) -> None:
    assert serving.main(["--url", url, "--model", MODEL, "--vocab-size", "1000", "--rates", "30,60",
                         "--num-requests", "3", "--input-len", "8", "--output-len", "4", "--seed", str(seed),
                         "--system", system, "--out", str(path)]) == 0


def test_combined_report_of_two_systems_under_the_same_load(tmp_path, capsys):
    a, b, c = tmp_path / "serving_vattn.json", tmp_path / "serving_vllm.json", tmp_path / "other.json"
    with FakeOpenAIServer(gap_s=0.001) as fast, FakeOpenAIServer(gap_s=0.15) as slow:
        _report(fast.url, a, "vattn", seed=1)
        _report(slow.url, b, "vllm", seed=1)
        _report(slow.url, c, "vllm", seed=2)
    out, png = tmp_path / "cmp.json", tmp_path / "cmp.png"
    assert bench_main(["serving_compare", "--combine", str(a), str(b), "--out", str(out), "--plot", str(png)]) == 0
    cmp = json.loads(out.read_text())
    assert cmp["same_load"] is True and cmp["rates_in_common"] == [30, 60]
    assert set(cmp["systems"]) == {"vattn", "vllm"}
    assert cmp["highest_rate_meeting_slo"] == {"vattn": 60, "vllm": None}  # 150 ms gaps miss 100 ms ITL
    assert cmp["slo_rate_vattn_over_vllm"] is None
    assert [r["completed"] for r in cmp["systems"]["vllm"]["rates"]] == [3, 3]
    assert "| vllm | 30 | 3 / 3 |" in capsys.readouterr().out
    assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size > 10_000
    again = tmp_path / "again.svg"
    assert bench_main(["plots", str(out), "--out", str(again)]) == 0
    assert "throughput vs request rate" in again.read_text()
    other = serving_compare.combine([json.loads(a.read_text()), json.loads(c.read_text())])
    assert other["same_load"] is False  # another seed: other prompts and arrival times
    with pytest.raises(ValueError, match="two reports of system"):
        serving_compare.combine([json.loads(b.read_text()), json.loads(c.read_text())])

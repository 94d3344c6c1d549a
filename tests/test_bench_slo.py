"""The serving benchmark's client against an in-process OpenAI-compatible server shaped like vLLM's
(`/v1/completions` streaming, the final usage chunk with `choices: []`, no `/stats`), and its SLO
verdicts. The thing under test is the client: what it sends and what it makes of what it gets."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
from aiohttp import web

from vattn_ray.bench import serving

MODEL = "llama-3-8b-instruct"


class FakeOpenAIServer:
    """Streams `len` one-token chunks `gap_s` apart, like vLLM's server with include_usage;
    `concurrency` requests at a time (None: any number), the others wait."""

    def __init__(self, gap_s: float, concurrency: int | None = None) -> None:
        self.gap_s = gap_s
        self.concurrency = concurrency
        self.slots: asyncio.Semaphore | None = None
        self.bodies: list[dict] = []
        self.stats_calls = 0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        if body["model"] != MODEL:
            return web.json_response({"error": {"message": f"model {body['model']!r} does not exist",
                                                "type": "NotFoundError", "code": 404}}, status=404)
        if self.concurrency is None:
            return await self._stream(request, body)
        if self.slots is None:
            self.slots = asyncio.Semaphore(self.concurrency)
        async with self.slots:
            return await self._stream(request, body)

    async def _stream(self, request: web.Request, body: dict) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        n = body["max_tokens"]
        for i in range(n):
            await asyncio.sleep(self.gap_s)
            chunk = {"id": "cmpl-1", "object": "text_completion", "model": MODEL,
                     "choices": [{"index": 0, "text": "x", "logprobs": None,
                                  "finish_reason": "length" if i == n - 1 else None}]}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        usage = {"id": "cmpl-1", "object": "text_completion", "model": MODEL, "choices": [],
                 "usage": {"prompt_tokens": len(body["prompt"]), "completion_tokens": n,
                           "total_tokens": len(body["prompt"]) + n}}
        await resp.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
        await resp.write_eof()
        return resp

    async def stats(self, request: web.Request) -> web.Response:
        self.stats_calls += 1
        return web.json_response({"detail": "Not Found"}, status=404)  # vLLM has no /stats

    def __enter__(self) -> "FakeOpenAIServer":
        self.thread.start()
        app = web.Application()
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/stats", self.stats)
        self.runner = web.AppRunner(app)

        async def start() -> int:
            await self.runner.setup()
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            await site.start()
            return site._server.sockets[0].getsockname()[1]

        port = asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def _run(url: str, tmp_path, *extra: str) -> dict:
    out = tmp_path / "serving.json"
    rc = serving.main(["--url", url, "--model", MODEL, "--vocab-size", "1000", "--rates", "20,40",
                       "--num-requests", "4", "--input-len", "12", "--output-len", "5", "--timeout", "30",
                       "--system", "vllm", "--out", str(out), *extra])
    assert rc == 0
    return json.loads(out.read_text())


def test_requests_have_vllm_server_shape_and_stream_is_read(tmp_path):
    with FakeOpenAIServer(gap_s=0.01) as fake:
        report = _run(fake.url, tmp_path, "--seed", "3")
    # 1 warm-up + 2 rates x 4 requests, every one a streaming token-id completion with ignore_eos.
    assert len(fake.bodies) == 9
    for body in fake.bodies:
        assert body["model"] == MODEL and body["stream"] is True
        assert body["stream_options"] == {"include_usage": True}
        assert body["ignore_eos"] is True and body["temperature"] == 0.0
        assert isinstance(body["prompt"], list) and len(body["prompt"]) == 12
        assert all(isinstance(t, int) and 0 <= t < 1000 for t in body["prompt"])
    assert [b["max_tokens"] for b in fake.bodies[1:]] == [5] * 8
    assert fake.stats_calls >= 1  # probed once per rate, then left alone
    assert report["config"]["system"] == "vllm"
    for r in report["results"]:
        assert r["completed"] == 4 and r["failed"] == 0 and r["output_len_short"] == 0
        assert r["output_tokens"] == 20 and r["prompt_tokens"] == 48 and r["tokens_per_chunk"] == 1.0
        assert r["kv_timeline"] == []
        # The server spaces chunks 10 ms apart; one read late on a busy machine shortens the next
        # gap, so bound the gaps' median and total (4 requests x 4 gaps), not each one.
        itl = sorted(r["itl_s"])
        assert len(itl) == 4 * 4 and itl[len(itl) // 2] >= 0.009 and sum(itl) >= 16 * 0.009
        assert all(q["finish_reason"] == "length" and q["chunks"] == 5 for q in r["requests"])
        assert len(r["load_sha256"]) == 64
    assert report["results"][0]["load_sha256"] != report["results"][1]["load_sha256"]
    # The same seed sends the same prompts at the same times: the digest is reproducible.
    with FakeOpenAIServer(gap_s=0.0) as other:
        again = _run(other.url, tmp_path, "--seed", "3")
    assert [r["load_sha256"] for r in again["results"]] == [r["load_sha256"] for r in report["results"]]
    assert [b["prompt"] for b in other.bodies] == [b["prompt"] for b in fake.bodies]


def test_slo_verdict_from_a_slow_server(tmp_path):
    # Every inter-token gap is at least 150 ms: an ITL bound of 100 ms cannot be met, 5 s is.
    with FakeOpenAIServer(gap_s=0.15) as fake:
        strict = _run(fake.url, tmp_path, "--slo-itl-ms", "100")
        loose = _run(fake.url, tmp_path, "--slo-itl-ms", "5000", "--slo-ttft-ms", "5000")
    assert strict["slo"]["itl_p99_ms_max"] == 100 and strict["slo"]["ttft_p99_ms_max"] == 1000
    assert [v["meets"] for v in strict["slo"]["rates"]] == [False, False]
    assert strict["slo"]["highest_rate_meeting_slo"] is None
    assert [v["meets"] for v in loose["slo"]["rates"]] == [True, True]
    assert loose["slo"]["highest_rate_meeting_slo"] == 40
    assert loose["slo"]["request_throughput_at_that_rate"] == loose["results"][1]["request_throughput"]


def _rate(rate: float, ttft_p99: float | None, itl_p99: float | None, failed: int = 0, completed: int = 10,
          achieved: float | None = None) -> dict:
    return {"rate": rate, "offered_rate": rate, "completed": completed, "failed": failed,
            "request_throughput": 0.8 * rate, "completion_rate": rate if achieved is None else achieved,
            "output_tokens_per_s": 100.0 * rate,
            "ttft_ms": {"p99": ttft_p99}, "itl_ms": {"p99": itl_p99}}


def test_slo_bounds_are_inclusive_and_failures_count():
    assert serving.meets_slo(_rate(1, 1000.0, 100.0), 1000, 100)
    assert not serving.meets_slo(_rate(1, 1000.1, 50.0), 1000, 100)
    assert not serving.meets_slo(_rate(1, 10.0, 100.1), 1000, 100)
    assert not serving.meets_slo(_rate(1, 10.0, 10.0, failed=1), 1000, 100)
    assert not serving.meets_slo(_rate(1, None, None, completed=0), 1000, 100)
    assert serving.meets_slo(_rate(1, 10.0, None), 1000, 100)  # one-token outputs have no gaps


def test_highest_rate_needs_every_lower_rate_to_meet_the_slo():
    results = [_rate(16, 300.0, 40.0), _rate(4, 50.0, 20.0), _rate(8, 80.0, 30.0), _rate(32, 2500.0, 90.0),
               _rate(64, 900.0, 99.0)]  # given out of order; 64 meets it by luck above a failing 32
    s = serving.slo_summary(results, 1000.0, 100.0)
    assert [v["rate"] for v in s["rates"]] == [4, 8, 16, 32, 64]
    assert [v["meets"] for v in s["rates"]] == [True, True, True, False, True]
    assert s["highest_rate_meeting_slo"] == 16 and s["output_tokens_per_s_at_that_rate"] == 1600.0
    assert serving.slo_summary(results, 40.0, 100.0)["highest_rate_meeting_slo"] is None
    assert serving.slo_summary(results, 5000.0, 100.0)["highest_rate_meeting_slo"] == 64


@pytest.mark.parametrize("achieved,ttft,expected", [(28.0, 2500.0, True), (30.0, 2500.0, False),
                                                    (20.0, 500.0, False)])
def test_saturation_needs_a_missed_slo_and_a_lagging_rate(achieved, ttft, expected):
    assert serving.saturated(_rate(32, ttft, 50.0, achieved=achieved), 1000.0, 100.0) is expected


def test_stop_when_saturated_skips_the_higher_rates(tmp_path):
    # One request at a time, 5 tokens 0.15 s apart: under 1.4 completions/s, 20 req/s only queue.
    with FakeOpenAIServer(gap_s=0.15, concurrency=1) as fake:
        report = _run(fake.url, tmp_path, "--stop-when-saturated")
    assert [r["rate"] for r in report["results"]] == [20]
    assert report["skipped_rates"] == [40]


def test_a_slow_server_that_keeps_up_is_not_saturated(tmp_path):
    # Every request takes 0.75 s (misses a 100 ms TTFT SLO), but any number run at once: requests
    # complete as fast as they arrive, so the higher rate is still measured.
    with FakeOpenAIServer(gap_s=0.15) as fake:
        report = _run(fake.url, tmp_path, "--stop-when-saturated", "--slo-ttft-ms", "100")
    assert [r["rate"] for r in report["results"]] == [20, 40]
    assert not report.get("skipped_rates")

"""The prefix-caching benchmark: the shared step loop's schedule, and a real run of the built-in model."""

import json

from vattn_ray.bench import prefix, step_driver


class CountingStepper:
    """An engine stand-in for the loop itself: each step gives every live request one token."""

    def __init__(self):
        self.live: dict[str, int] = {}
        self.added: list[str] = []

    def add(self, request_id, prompt, max_tokens):
        self.live[request_id] = max_tokens
        self.added.append(request_id)

    def step(self):
        out = []
        for rid in list(self.live):
            self.live[rid] -= 1
            out.append((rid, [7], self.live[rid] == 0, 0))
            if self.live[rid] == 0:
                del self.live[rid]
        return out

    def busy(self):
        return bool(self.live)


def test_loop_sends_chained_turns_after_their_predecessor_and_waits_for_arrivals():
    s = CountingStepper()
    # 0 -> 1 -> 2 is a conversation; 3 arrives 0.05 s after the start.
    res = step_driver.run(s, [[1]] * 4, [3, 2, 1, 2], after=[-1, 0, 1, -1], arrival=[0, 0, 0, 0.05], name="j")
    assert s.added[0] == "j-0" and s.added.index("j-1") < s.added.index("j-2")
    assert res["sent_at"][1] >= res["finished_at"][0] and res["sent_at"][2] >= res["finished_at"][1]
    assert res["sent_at"][3] >= 0.05
    assert res["output_tokens"] == [3, 2, 1, 2]
    assert all(f <= d for f, d in zip(res["first_token_at"], res["finished_at"]))
    assert res["seconds"] == max(res["finished_at"])


def test_workloads_share_prefixes_as_described():
    shared = prefix.shared_job(10, 64, 16, 4, vocab=500, rate=0.0)
    system = shared.job.prompts[0][:64]
    assert all(p[:64] == system and 12 <= len(p) - 64 <= 20 for p in shared.job.prompts)
    turns = prefix.multiturn_job(3, 4, 20, 5, 6, vocab=500)
    prompts, after = turns.job.prompts, turns.after
    assert after[:4] == [-1, 0, 1, 2] and len(prompts) == 12
    for i, a in enumerate(after):
        if a >= 0:  # each turn extends the previous prompt by an answer (6) and a message (5)
            assert prompts[i][:len(prompts[a])] == prompts[a] and len(prompts[i]) == len(prompts[a]) + 11


def test_run_on_the_built_in_model(tmp_path):
    out = tmp_path / "prefix.json"
    # 4 KiB pages: page groups of a few tokens for the tiny model, so short prompts share pages.
    assert prefix.main(["--systems", "vattn,vattn-nocache,vllm", "--page-bytes", "4096",
                        "--max-num-batched-tokens", "128", "--shared-requests", "16", "--system-len", "96",
                        "--user-len", "16", "--conversations", "3", "--turns", "3", "--first-len", "40",
                        "--turn-len", "8", "--output-len", "6", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    rec = {(r["system"], r["workload"]): r for r in data["results"]}
    for workload in ("shared", "multiturn"):
        on, off, peer = rec["vattn", workload], rec["vattn-nocache", workload], rec["vllm", workload]
        assert on["output_tokens"] == off["output_tokens"] == on["output_tokens_expected"]
        assert on["cached_tokens"] > 0 and off["cached_tokens"] == 0
        assert on["outputs_sha256"] == off["outputs_sha256"], "caching changed greedy outputs"
        assert 0 < on["ttft_p50_ms"] <= on["ttft_p99_ms"]
        assert data["ratios"][workload]["same_outputs_cached_and_uncached"] is True
        # vLLM is not installed here: reported unavailable, with no numbers.
        assert peer["output_tokens_per_s"] is None and "unavailable" in peer
    shared = rec["vattn", "shared"]
    # 15 of 16 requests can find the 96-token system prompt (one computes it first): aligned to groups.
    assert shared["requests_with_cache_hit"] >= 8
    assert all(c % 16 == 0 for c in shared["per_request"]["cached_tokens"] if c)

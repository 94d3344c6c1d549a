"""Drive an engine's step loop over a schedule of requests; time each request's first token.

Both sides of the prefix-caching benchmark use this one loop: this project's `LLMEngine` and
stock vLLM's (from vattn_ray/bench/vllm_peer.py, which runs in vLLM's environment), so release
times, the clock and what counts as "first token" are the same code for both. It imports nothing
of the project.

A schedule is three lists over requests: `prompts` (token ids), `max_tokens`, and `after`
(-1, or the index of the request whose finish releases this one: the next turn of a
conversation is sent when the previous answer is complete) with `arrival` (seconds after the
start before which it is not sent). A request is added when both hold.
"""

from __future__ import annotations

import hashlib
import heapq
import time
from typing import Protocol


class Stepper(Protocol):
    """The three calls the loop needs from an engine."""

    def add(self, request_id: str, prompt: list[int], max_tokens: int) -> None:
        """Admit a greedy request that makes exactly `max_tokens` tokens (ignore_eos)."""

    def step(self) -> list[tuple[str, list[int], bool, int | None]]:
        """One engine step: (request id, token ids new since the last output, finished,
        prompt tokens served from the prefix cache or None) per request with news."""

    def busy(self) -> bool:
        """Whether any added request is unfinished."""


def run(stepper: Stepper, prompts: list[list[int]], max_tokens: list[int], after: list[int],
        arrival: list[float], name: str = "r", clock=time.perf_counter) -> dict:
    """Send every request when it is due, step until all finish; per-request times in seconds.

    Request ids are `{name}-{index}` (unique per job: an engine may still hold a finished id).
    Returns {"seconds": start to last finish, "sent_at", "first_token_at", "finished_at",
    "output_tokens", "cached_tokens" (lists by request index), "outputs_sha256" (of every
    request's token ids in index order: equal digests mean equal greedy outputs)}.
    """
    n = len(prompts)
    children: dict[int, list[int]] = {}
    due: list[tuple[float, int]] = []  # (release time, index) of requests whose predecessor is done
    for i in range(n):
        if after[i] < 0:
            heapq.heappush(due, (arrival[i], i))
        else:
            children.setdefault(after[i], []).append(i)
    sent_at: list[float | None] = [None] * n
    first: list[float | None] = [None] * n
    finished: list[float | None] = [None] * n
    tokens: list[list[int]] = [[] for _ in range(n)]
    cached: list[int | None] = [None] * n
    index = {f"{name}-{i}": i for i in range(n)}
    done = 0
    t0 = clock()
    while done < n:
        now = clock() - t0
        while due and due[0][0] <= now:
            _, i = heapq.heappop(due)
            stepper.add(f"{name}-{i}", prompts[i], max_tokens[i])
            sent_at[i] = clock() - t0
        if not stepper.busy():
            if not due:
                raise RuntimeError(f"{n - done} requests can never be sent: their predecessor is missing")
            time.sleep(max(0.0, due[0][0] - (clock() - t0)))
            continue
        for rid, new, fin, num_cached in stepper.step():
            i = index[rid]
            t = clock() - t0
            if new and first[i] is None:
                first[i] = t
            tokens[i].extend(new)
            if num_cached is not None:
                cached[i] = max(cached[i] or 0, num_cached)
            if fin and finished[i] is None:
                finished[i] = t
                done += 1
                for c in children.get(i, ()):
                    heapq.heappush(due, (max(arrival[c], t), c))
    digest = hashlib.sha256(repr(tokens).encode()).hexdigest()
    return {"seconds": max(f for f in finished), "sent_at": sent_at, "first_token_at": first,
            "finished_at": finished, "output_tokens": [len(t) for t in tokens], "cached_tokens": cached,
            "outputs_sha256": digest}

"""Head-side request state: what the scheduler knows about one request. Pure Python.

A request's tokens are its prompt followed by the tokens generated so far. `num_computed` counts
the leading tokens whose KV is in its slot; the rest are computed by the next chunks. A decode is
the case where exactly one token (the last sampled one) is not yet computed.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from vattn_ray.sampling_params import SamplingParams
from vattn_ray.scheduler.plan import SampledToken


class RequestRejected(ValueError):
    """A request that can never be served; the message says what to change."""


class QueueFull(ValueError):
    """Too many requests are waiting (`max_queued_requests`): retry later (HTTP 429)."""


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True)
class RequestUpdate:
    """What one `Scheduler.update` call produced for one request."""

    req_id: str
    new_token_ids: list[int]
    new_tokens: list[SampledToken]
    finished: bool
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | None = None  # the stop token id that ended it (None for EOS or length)
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (page-group aligned)


class Request:
    """One request as the head scheduler tracks it (mutable; owned by the scheduler)."""

    __slots__ = ("req_id", "prompt_token_ids", "params", "eos_token_ids", "output_token_ids",
                 "status", "slot", "num_computed", "num_tokens", "sent", "seq_no", "max_kv_tokens",
                 "scheduled_step", "planned_computed", "planned_tokens", "epoch", "block_hashes",
                 "num_cached_tokens", "prefix_hit")

    def __init__(self, req_id: str, prompt_token_ids: Sequence[int], params: SamplingParams,
                 eos_token_ids: Collection[int], seq_no: int) -> None:
        self.req_id = req_id
        self.prompt_token_ids = tuple(int(t) for t in prompt_token_ids)
        self.params = params
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self.output_token_ids: list[int] = []
        self.status = RequestStatus.WAITING
        self.slot: int | None = None
        self.num_computed = 0
        self.num_tokens = len(self.prompt_token_ids)  # prompt + output, kept as a field: hot path
        self.sent = False  # whether workers hold its NewRequest (sent in an executed plan)
        self.seq_no = seq_no  # arrival order
        self.scheduled_step = -1  # the last step that computes some of its tokens
        # What plans still in flight will have computed / produced once they run: the head plans
        # the next step from these; `num_computed` and `num_tokens` move only when results arrive.
        self.planned_computed = 0
        self.planned_tokens = self.num_tokens
        self.epoch = 0  # bumped on preemption: results of plans from an older epoch are stale
        self.block_hashes: list[bytes] = []  # prefix-cache keys of its full page groups, as computed
        self.num_cached_tokens = -1  # prompt tokens served from the prefix cache at first admission
        self.prefix_hit = 0  # tokens served from the prefix cache at its latest admission
        # The last sampled token is never fed back, so the KV never holds more than this.
        self.max_kv_tokens = len(self.prompt_token_ids) + params.max_tokens - 1

    def append_output(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.num_tokens += 1

    @property
    def pending_samples(self) -> int:
        """Tokens sampled by plans in flight whose ids the head has not seen yet."""
        return self.planned_tokens - self.num_tokens

    def reset_plan(self) -> None:
        """Forget what plans in flight promised (they did not run, or their results are stale)."""
        self.planned_computed = self.num_computed
        self.planned_tokens = self.num_tokens

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    def tokens(self, start: int, end: int) -> tuple[int, ...]:
        """Token ids at positions [start, end) of prompt + output."""
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return tuple(self.output_token_ids[start - p:end - p])
        return self.prompt_token_ids[start:] + tuple(self.output_token_ids[:end - p])

    def stop_after(self, token_id: int, max_model_len: int) -> tuple[str, int | None] | None:
        """(finish_reason, stop_reason) if the just-appended `token_id` ends the request."""
        n = len(self.output_token_ids)
        params = self.params
        if n >= params.min_tokens:
            if token_id in self.eos_token_ids and not params.ignore_eos:
                return "stop", None
            if token_id in params.stop_token_ids:
                return "stop", token_id
        if n >= params.max_tokens or self.num_tokens >= max_model_len:
            return "length", None
        return None

"""Prometheus metrics of one replica, exported through Ray's metrics endpoint (`ray.util.metrics`).

Ray prefixes every name with ``ray_`` on export. Engine gauges are sampled from `engine.stats()`
by a background task; request metrics (latencies, tokens) are recorded by the HTTP layer.
Without a Ray cluster the `ray.util.metrics` objects record nothing, so tests need no Ray.
"""

from __future__ import annotations

import time

from ray.util.metrics import Counter, Gauge, Histogram

_LATENCY_BOUNDS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
_ITL_BOUNDS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]
_TAGS = ("model",)

# metric name -> (description, engine.stats() keys to read it from, first present wins)
ENGINE_GAUGES = {
    "vattn_num_requests_running": ("Sequences in the running batch.", ("num_running",)),
    "vattn_num_requests_waiting": ("Sequences waiting for a KV slot or pages.", ("num_waiting",)),
    "vattn_kv_page_groups_mapped": ("KV page groups backed by physical memory.",
                                    ("kv_groups_mapped", "num_groups_mapped")),
    "vattn_kv_page_groups_free": ("KV page groups free in the physical pool.",
                                  ("kv_groups_free", "num_groups_free")),
    "vattn_kv_page_groups_idle": ("KV page groups kept mapped by finished requests for reuse "
                                  "(deferred reclamation).", ("kv_groups_idle", "num_groups_idle")),
    "vattn_kv_fragmentation": ("Fraction of mapped KV memory not holding live tokens.",
                               ("kv_fragmentation",)),
}

class ServerMetrics:
    """All metrics of one served model; `model` tags every sample."""

    def __init__(self, model: str) -> None:
        self.tags = {"model": model}
        self.gauges = {name: (Gauge(name, description=desc, tag_keys=_TAGS), keys)
                       for name, (desc, keys) in ENGINE_GAUGES.items()}
        self.preemptions = Counter("vattn_num_preemptions_total",
                                   description="Sequences preempted (recomputed later) for lack of KV pages.",
                                   tag_keys=_TAGS)
        self.ttft = Histogram("vattn_time_to_first_token_seconds", description="Arrival to first token.",
                              boundaries=_LATENCY_BOUNDS, tag_keys=_TAGS)
        self.itl = Histogram("vattn_inter_token_latency_seconds",
                             description="Time between successive generated tokens of a sequence.",
                             boundaries=_ITL_BOUNDS, tag_keys=_TAGS)
        self.e2e = Histogram("vattn_request_latency_seconds", description="Arrival to last token.",
                             boundaries=_LATENCY_BOUNDS, tag_keys=_TAGS)
        self.prompt_tokens = Counter("vattn_prompt_tokens_total", description="Prompt tokens admitted.",
                                     tag_keys=_TAGS)
        self.generation_tokens = Counter("vattn_generation_tokens_total", description="Tokens generated.",
                                         tag_keys=_TAGS)
        self.requests = Counter("vattn_requests_total", description="Finished requests by finish reason.",
                                tag_keys=("model", "finish_reason"))
        self.client_aborts = Counter("vattn_client_aborts_total",
                                     description="Requests aborted because the client went away.",
                                     tag_keys=_TAGS)
        self._last_preemptions: int | None = None

    def record_engine_stats(self, stats: dict) -> None:
        """Copy engine gauges; turn the engine's cumulative preemption count into a counter."""
        for gauge, keys in self.gauges.values():
            value = next((stats[k] for k in keys if stats.get(k) is not None), None)
            if value is not None:
                gauge.set(float(value), tags=self.tags)
        total = stats.get("num_preemptions")
        if total is not None:
            total = int(total)
            if self._last_preemptions is not None and total > self._last_preemptions:
                self.preemptions.inc(total - self._last_preemptions, tags=self.tags)
            self._last_preemptions = total

    def request(self, prompt_tokens: int) -> "RequestTimer":
        self.prompt_tokens.inc(prompt_tokens, tags=self.tags)
        return RequestTimer(self)


class RequestTimer:
    """Latency bookkeeping of one engine request (all of its n sequences)."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics
        self.start = time.monotonic()
        self.last: float | None = None
        self.tokens = 0

    def on_tokens(self, new_tokens: int, first_token_time: float | None = None) -> None:
        """Called when an engine output brings `new_tokens` generated tokens (summed over the n
        sequences, which advance together: one step = one token each = one inter-token gap).
        `first_token_time` (the engine's, `time.monotonic`) times the first token when the output
        arrives later than the token did (a non-streamed request gets only its final output)."""
        if new_tokens <= 0:
            return
        now = time.monotonic()
        m = self.metrics
        if self.last is None:
            m.ttft.observe((first_token_time or now) - self.start, tags=m.tags)
        else:
            m.itl.observe(now - self.last, tags=m.tags)
        self.last = now
        self.tokens += new_tokens
        m.generation_tokens.inc(new_tokens, tags=m.tags)

    def on_finish(self, finish_reasons: list[str | None]) -> None:
        m = self.metrics
        m.e2e.observe(time.monotonic() - self.start, tags=m.tags)
        for reason in finish_reasons:
            m.requests.inc(1, tags={**m.tags, "finish_reason": reason or "unknown"})

"""Prometheus metrics of one replica under vLLM's names, plus this runtime's own KV-memory metrics.

Every metric is recorded twice:
- into a `prometheus_client` registry of this replica, served by the app's ``GET /metrics`` with
  vLLM's exact names (``vllm:generation_tokens_total``, ...), so vLLM's Grafana dashboards apply;
- into Ray's metrics agent (`ray.util.metrics`), as Ray Serve LLM does: Ray allows no ':' in a
  name, so ``vllm:x`` becomes ``vllm_x``, and Ray prefixes ``ray_`` on export
  (``ray_vllm_generation_tokens_total``). Without a Ray cluster these record nothing.
Labels: ``model_name`` (the first served name) on every metric, ``finished_reason`` on
``vllm:request_success_total``; Ray's copy also carries ``ReplicaId``, as Ray Serve LLM's does.

Sources: gauges and the preemption and page-group counters come from `engine.stats()`, sampled on
every scrape and every `stats_interval_s`; token counts and latencies are measured by the HTTP
layer as outputs stream out. A request with n > 1 counts as n requests, as in vLLM, where each of
the n sequences is its own engine request. The prefix-cache counters count prompt tokens looked up in
the cache and those served from it (vLLM's meaning), from `engine.stats()`.
An elastic pair (`stats()["elastic"]`) adds `_ELASTIC` below: its transitions, whether it is
merged, its KV capacity in tokens, and the time each split took to restore the dropped layers.
"""

from __future__ import annotations

import re
import time

import prometheus_client
from ray.util import metrics as ray_metrics

# vLLM's buckets, so dashboards built for vLLM read the same.
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0]
E2E_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
               240.0, 480.0, 960.0, 1920.0, 7680.0]

# name (without Prometheus' "_total" on counters) -> (kind, help, engine.stats() key or None)
_ENGINE_GAUGES = {
    "vllm:num_requests_running": "Number of requests in model execution batches.",
    "vllm:num_requests_waiting": "Number of requests waiting to be processed.",
    "vllm:kv_cache_usage_perc": "KV-cache usage. 1 means 100 percent usage (page groups held by running "
                                "requests over the pool).",
    "vattn:kv_page_groups_mapped": "KV page groups backed by physical memory (idle slots' kept pages included).",
    "vattn:kv_page_groups_free": "KV page groups free in the physical pool.",
    "vattn:kv_page_groups_idle": "KV page groups kept mapped by finished requests for reuse (deferred "
                                 "reclamation).",
    "vattn:kv_page_groups_capacity": "KV page groups the pool holds.",
    "vattn:kv_fragmentation": "Fraction of mapped KV memory not holding a live token.",
}
# counter name -> (help, cumulative engine.stats() key)
_ENGINE_COUNTERS = {
    "vllm:num_preemptions": ("Cumulative number of preemptions (recomputed later) for lack of KV memory.",
                             "num_preemptions"),
    "vattn:kv_page_group_maps": ("KV page groups mapped since start-up (rate(): the map rate).",
                                 "groups_mapped_total"),
    "vattn:kv_page_group_unmaps": ("KV page groups unmapped since start-up (rate(): the unmap rate).",
                                   "groups_unmapped_total"),
    "vllm:prefix_cache_queries": ("Prefix cache queries, in terms of number of queried tokens.",
                                  "prefix_cache_queries"),
    "vllm:prefix_cache_hits": ("Prefix cache hits, in terms of number of cached tokens.", "prefix_cache_hits"),
}


# An elastic pair's metrics (docs/elastic.md): name -> (kind, help)
_ELASTIC = {
    "vattn:elastic_merges": ("counter", "Merges of the elastic pair into a two-stage pipeline."),
    "vattn:elastic_splits": ("counter", "Splits of the elastic pair back into two replicas."),
    "vattn:elastic_requests_recomputed": ("counter", "Requests moved (and recomputed) by merges and splits."),
    "vattn:elastic_merged": ("gauge", "1 while the elastic pair serves as one pipeline, else 0."),
    "vattn:kv_capacity_tokens": ("gauge", "Tokens the elastic pair's KV caches hold now (more when merged)."),
    "vattn:elastic_restore_seconds": ("histogram", "Time a split took to copy the dropped layers back."),
    "vattn:elastic_transition_seconds": ("histogram", "Time a merge or split took (drain and hand-over)."),
}
RESTORE_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0]


def _ray_name(name: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def _replica_id() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - outside a Serve replica
        return ""


class _Metric:
    """One metric in both registries; `labels` holds the values of every label but the extra ones."""

    def __init__(self, kind: str, name: str, doc: str, labels: dict[str, str], registry,
                 extra_labels: tuple[str, ...] = (), buckets: list[float] | None = None) -> None:
        self.kind, self.labels = kind, labels
        names = tuple(labels) + extra_labels
        prom_kw = {"buckets": buckets} if buckets else {}
        prom_cls = {"gauge": prometheus_client.Gauge, "counter": prometheus_client.Counter,
                    "histogram": prometheus_client.Histogram}[kind]
        self.prom = prom_cls(name, doc, labelnames=names, registry=registry, **prom_kw)
        ray_kw = {"boundaries": buckets} if buckets else {}
        ray_cls = {"gauge": ray_metrics.Gauge, "counter": ray_metrics.Counter,
                   "histogram": ray_metrics.Histogram}[kind]
        self.ray = ray_cls(_ray_name(name), description=doc, tag_keys=names + ("ReplicaId",), **ray_kw)
        self.ray_tags = {**labels, "ReplicaId": _replica_id()}
        if not extra_labels:
            self.prom.labels(**labels)  # exported (at 0) before the first event, as vLLM's are

    def record(self, value: float, **extra: str) -> None:
        """set (gauge), inc (counter) or observe (histogram) `value`."""
        child = self.prom.labels(**self.labels, **extra)
        tags = {**self.ray_tags, **extra}
        if self.kind == "gauge":
            child.set(value)
            self.ray.set(value, tags=tags)
        elif self.kind == "counter":
            if value > 0:  # Ray rejects non-positive increments
                child.inc(value)
                self.ray.inc(value, tags=tags)
        else:
            child.observe(value)
            self.ray.observe(value, tags=tags)


class ServerMetrics:
    """All metrics of one served model; `model` (the first served name) labels every sample."""

    def __init__(self, model: str, max_model_len: int = 8192) -> None:
        self.model = model
        self.registry = prometheus_client.CollectorRegistry(auto_describe=True)
        labels = {"model_name": model}

        def metric(kind: str, name: str, doc: str, **kw) -> _Metric:
            return _Metric(kind, name, doc, labels, self.registry, **kw)

        self.gauges = {name: metric("gauge", name, doc) for name, doc in _ENGINE_GAUGES.items()}
        self.engine_counters = {name: (metric("counter", name, doc), key)
                                for name, (doc, key) in _ENGINE_COUNTERS.items()}
        self.prompt_tokens = metric("counter", "vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = metric("counter", "vllm:generation_tokens",
                                        "Number of generation tokens processed.")
        self.request_success = metric("counter", "vllm:request_success", "Count of successfully processed "
                                      "requests.", extra_labels=("finished_reason",))
        self.client_aborts = metric("counter", "vattn:client_aborts", "Requests aborted because the client "
                                    "went away.")
        self.ttft = metric("histogram", "vllm:time_to_first_token_seconds", "Histogram of time to first "
                           "token in seconds.", buckets=TTFT_BUCKETS)
        self.itl = metric("histogram", "vllm:inter_token_latency_seconds", "Histogram of inter-token "
                          "latency in seconds.", buckets=ITL_BUCKETS)
        self.tpot = metric("histogram", "vllm:request_time_per_output_token_seconds", "Histogram of "
                           "time_per_output_token_seconds per request.", buckets=ITL_BUCKETS)
        self.e2e = metric("histogram", "vllm:e2e_request_latency_seconds", "Histogram of e2e request "
                          "latency in seconds.", buckets=E2E_BUCKETS)
        length_buckets = _length_buckets(max_model_len)
        self.request_prompt_tokens = metric("histogram", "vllm:request_prompt_tokens", "Number of prefill "
                                            "tokens processed.", buckets=length_buckets)
        self.request_generation_tokens = metric("histogram", "vllm:request_generation_tokens", "Number of "
                                                "generation tokens processed.", buckets=length_buckets)
        self._last_totals: dict[str, int] = {}
        self._labels = labels
        self.elastic: dict[str, _Metric] | None = None  # made at the first stats of an elastic pair
        self._transitions_seen = 0

    def record_engine_stats(self, stats: dict) -> None:
        """Gauges from a snapshot of `engine.stats()`; its cumulative counts become counters."""
        mapped, idle, capacity = (stats.get(k) for k in ("num_groups_mapped", "num_groups_idle",
                                                         "capacity_groups"))
        values = {
            "vllm:num_requests_running": stats.get("num_running"),
            "vllm:num_requests_waiting": stats.get("num_waiting"),
            "vllm:kv_cache_usage_perc": (mapped - idle) / capacity if capacity else None,
            "vattn:kv_page_groups_mapped": mapped,
            "vattn:kv_page_groups_free": stats.get("num_groups_free"),
            "vattn:kv_page_groups_idle": idle,
            "vattn:kv_page_groups_capacity": capacity,
            "vattn:kv_fragmentation": stats.get("kv_fragmentation"),
        }
        for name, value in values.items():
            if value is not None:
                self.gauges[name].record(float(value))
        for name, (counter, key) in self.engine_counters.items():
            total = stats.get(key)
            if total is None:
                continue
            last = self._last_totals.get(key, 0)  # the engine counts from its start, as we do
            if int(total) > last:
                counter.record(int(total) - last)
            self._last_totals[key] = max(last, int(total))
        if stats.get("elastic") is not None:
            self._record_elastic(stats["elastic"])

    def _record_elastic(self, pair: dict) -> None:
        """An elastic pair's state and the transitions it made since the last call."""
        if self.elastic is None:
            self.elastic = {}
            for name, (kind, doc) in _ELASTIC.items():
                extra = ("event",) if name == "vattn:elastic_transition_seconds" else ()
                buckets = RESTORE_BUCKETS if kind == "histogram" else None
                self.elastic[name] = _Metric(kind, name, doc, self._labels, self.registry, extra_labels=extra,
                                             buckets=buckets)
        m = self.elastic
        m["vattn:elastic_merged"].record(1.0 if pair["merged"] else 0.0)
        m["vattn:kv_capacity_tokens"].record(float(pair["kv_capacity_tokens"]))
        for name, key in (("vattn:elastic_merges", "merges"), ("vattn:elastic_splits", "splits"),
                          ("vattn:elastic_requests_recomputed", "requests_recomputed")):
            last = self._last_totals.get(f"elastic.{key}", 0)
            if pair[key] > last:
                m[name].record(pair[key] - last)
                self._last_totals[f"elastic.{key}"] = pair[key]
        # Each transition once: the events listed are the latest ones, the counts are totals.
        events, total = pair["events"], pair["merges"] + pair["splits"]
        unseen = min(max(0, total - self._transitions_seen), len(events))
        for event in events[len(events) - unseen:] if unseen else []:
            m["vattn:elastic_transition_seconds"].record(event["duration_s"], event=event["event"])
            if event.get("restore_s") is not None:
                m["vattn:elastic_restore_seconds"].record(event["restore_s"])
        self._transitions_seen = total

    def exposition(self) -> bytes:
        """This replica's metrics in the Prometheus text format."""
        return prometheus_client.generate_latest(self.registry)

    def request(self, prompt_tokens: int) -> "RequestTimer":
        return RequestTimer(self, prompt_tokens)


def _length_buckets(max_model_len: int) -> list[float]:
    """1, 2, 5, 10, 20, 50, ... up to max_model_len (vLLM's token-count buckets)."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_model_len:
                return out
            out.append(float(m * scale))
        scale *= 10


class RequestTimer:
    """Latency and token bookkeeping of one engine request, per sequence (choice)."""

    def __init__(self, metrics: ServerMetrics, prompt_tokens: int) -> None:
        self.metrics = metrics
        self.prompt_tokens = prompt_tokens
        self.start = time.monotonic()
        self.first: dict[int, float] = {}  # sequence index -> time of its first token
        self.last: dict[int, float] = {}  # ... of its latest token
        self.count: dict[int, int] = {}  # ... its tokens so far (outputs may be deltas)
        self.done: set[int] = set()

    def on_output(self, out) -> None:
        """Record what a `RequestOutput` brought: new tokens and finished sequences.

        A streamed request brings every step's tokens as they come (one gap each); a plain one
        only its final output, with all its tokens: its first token is timed by the engine
        (`first_token_time`) and its later gaps are counted at their mean (count and sum exact).
        """
        now = time.monotonic()
        m = self.metrics
        for o in out.outputs:
            new = len(o.delta_token_ids)
            if new:
                m.generation_tokens.record(new)
                self.count[o.index] = self.count.get(o.index, 0) + new
                if o.index not in self.first:
                    first = min(now, out.metrics.get("first_token_time") or now)
                    self.first[o.index] = first
                    m.ttft.record(first - self.start)
                    m.prompt_tokens.record(self.prompt_tokens)
                    gaps, since = new - 1, first  # tokens that came with the first one
                else:
                    gaps, since = new, self.last[o.index]
                for _ in range(gaps):
                    m.itl.record((now - since) / gaps)
                self.last[o.index] = now
            if o.finish_reason is not None and o.index not in self.done:
                self._finished(o, now)

    def _finished(self, o, now: float) -> None:
        m = self.metrics
        self.done.add(o.index)
        m.e2e.record(now - self.start)
        m.request_success.record(1, finished_reason=o.finish_reason)
        m.request_prompt_tokens.record(self.prompt_tokens)
        tokens = self.count.get(o.index, 0)
        m.request_generation_tokens.record(tokens)
        if tokens > 1:
            m.tpot.record((self.last[o.index] - self.first[o.index]) / (tokens - 1))

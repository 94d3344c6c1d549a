"""Worker side of elastic memory: paged weights, the pair link, pipeline stages, restore.

Every function here takes the `Worker` first and runs on each rank through
`Executor.run_on_workers`, between steps (never concurrently with one). A worker becomes elastic
once (`enable`); then it is either *whole* (all layers, the full KV layout) or a *stage* of a pair
(half of the layers, a KV layout of that half, every other page lent to the KV cache).

Rank r of replica A and rank r of replica B share a two-member process group (NCCL on GPU, gloo on
CPU): hidden states go from stage 0 to stage 1 over it, failure flags are all-reduced over it so
both stages skip a step together, and dropped layers come back over it at split.

HOT PATH: `run_stage` runs once per step while merged.
"""

from __future__ import annotations

import logging
import math
import socket
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from vattn_ray.elastic.pages import DevicePages, HeldPool
from vattn_ray.elastic.weights import PagedWeights
from vattn_ray.layout import KVLayout
from vattn_ray.scheduler.plan import PREVIOUS_SAMPLE, KVFailure, StepOutput, StepPlan

logger = logging.getLogger(__name__)
_HIDDEN_TAG, _FLAG_TAG = 1, 2


@dataclass
class ElasticState:
    """What an elastic worker keeps between calls."""

    pages: DevicePages
    weights: PagedWeights
    full_layout: KVLayout
    stage: int | None = None  # None: whole; 0 or 1: pipeline stage
    layers: tuple[int, int] = (0, 0)  # [first, end) of the resident layers
    pair: object | None = None  # the two-member process group
    pair_rank: int = 0
    events: list[dict] = field(default_factory=list)


def _memory_for(device: torch.device, page_bytes: int):
    if device.type == "cuda":
        from vattn_ray.kvcache.cuda import CudaVMM

        return CudaVMM(device, page_bytes=page_bytes)
    from vattn_ray.kvcache.host import HostVMM

    return HostVMM(page_bytes=page_bytes)


def _new_kv(worker, st: ElasticState, layout: KVLayout, max_groups: int | None = None):
    """A KV manager over every free page (whole page groups; at most `max_groups`)."""
    from vattn_ray.kvcache import KVManager
    from vattn_ray.logits_processors import TokenHistory

    groups = st.pages.num_free // layout.num_tensors
    if max_groups is not None:
        groups = min(groups, max_groups)
    pool = HeldPool(st.pages, groups * layout.num_tensors)
    worker.kv = KVManager(layout, st.pages.memory, groups, worker.dtype, rank=worker.rank, pool=pool)
    # Requests and histories are per slot of the old cache; the head re-announces every request.
    worker.requests.clear()
    worker.history = TokenHistory(layout.max_slots, layout.max_tokens_per_slot, worker.device)
    worker.last_sampled.zero_()
    worker.last_executed = True
    return groups


def _recapture(worker) -> None:
    worker.graphs = worker._capture_decode_graphs() if worker._use_graphs() else None


def _info(worker, layout: KVLayout, groups: int):
    from workers.worker import WorkerInfo

    st: ElasticState = worker.elastic
    first, end = st.layers
    weight_bytes = sum(p.numel() * p.element_size() for p in worker.model.parameters())
    weight_bytes -= sum(st.weights.used_bytes[i] for i in range(st.weights.num_layers)
                        if not first <= i < end)
    return WorkerInfo(worker.rank, layout, groups, weight_bytes, groups * layout.page_group_bytes,
                      type(worker.model).__name__, str(worker.device))


# ---- enabling and the pair link ---------------------------------------------------------------
def enable(worker) -> dict:
    """Move the decoder layers onto pages shared with the KV cache (once, right after load)."""
    old = worker.kv
    layout, groups = old.layout, old.num_page_groups
    worker.graphs = None  # captured over the old cache's tensors
    old.close()
    pages = DevicePages(_memory_for(worker.device, layout.page_bytes))
    weights = PagedWeights(worker.model.layers, pages)
    pages.create(groups * layout.num_tensors)
    st = ElasticState(pages, weights, layout, layers=(0, weights.num_layers))
    worker.elastic = st
    _new_kv(worker, st, layout, groups)
    _recapture(worker)
    logger.info("rank %d: %d decoder layers on %d pages of %d bytes, KV %d page groups",
                worker.rank, weights.num_layers, sum(weights.pages_per_layer), layout.page_bytes, groups)
    return {"weight_pages": sum(weights.pages_per_layer), "kv_groups": groups}


def pair_address(worker) -> tuple[str, int]:
    """An address on this worker's host where a pair store can listen."""
    try:
        import ray

        host = ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"
    except ImportError:
        host = "127.0.0.1"
    with socket.socket() as s:
        s.bind(("", 0))
        return host, s.getsockname()[1]


def join_pair(worker, addresses: list[tuple[str, int]], pair_rank: int, timeout_s: float) -> int:
    """Join the two-member group with the same rank of the other replica (both call this at once;
    `addresses[rank]` is where replica A's rank `rank` listens)."""
    st: ElasticState = worker.elastic
    host, port = addresses[worker.rank]
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, 2, pair_rank == 0, timeout=timeout)
    if worker.device.type == "cuda":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout  # a peer that never answers fails the call instead of hanging it
        st.pair = dist.ProcessGroupNCCL(store, pair_rank, 2, opts)
    else:
        st.pair = dist.ProcessGroupGloo(store, pair_rank, 2, timeout)
    st.pair_rank = pair_rank
    st.store = store  # the group needs its store alive
    flag = torch.ones(1, device=worker.device)
    st.pair.allreduce([flag]).wait()  # both ends are up
    return int(flag.item())


# ---- merge and split --------------------------------------------------------------------------
def stage_layout(full: KVLayout, num_layers: int) -> KVLayout:
    """The KV layout of a stage holding `num_layers` of the model's layers."""
    per_tensor = math.gcd(full.layers_per_tensor, num_layers)
    return KVLayout.build(num_layers=num_layers, layers_per_tensor=per_tensor,
                          num_kv_heads=full.num_kv_heads, head_dim=full.head_dim, itemsize=full.itemsize,
                          page_bytes=full.page_bytes, max_slots=full.max_slots,
                          max_model_len=full.max_tokens_per_slot)


def stage_layers(num_layers: int, stage: int) -> tuple[int, int]:
    half = num_layers // 2
    return (0, half) if stage == 0 else (half, num_layers)


def merge(worker, stage: int):
    """Become pipeline `stage`: drop the other half's layers and lend their pages to a KV cache
    laid out for this half. The cache must be empty (the head recomputes what was running)."""
    st: ElasticState = worker.elastic
    start = time.perf_counter()
    worker.kv.close()
    worker.graphs = None
    first, end = stage_layers(st.weights.num_layers, stage)
    freed = st.weights.drop([i for i in range(st.weights.num_layers) if not first <= i < end])
    st.stage, st.layers = stage, (first, end)
    layout = stage_layout(st.full_layout, end - first)
    groups = _new_kv(worker, st, layout)
    took = time.perf_counter() - start
    logger.info("rank %d: stage %d of a pair, layers [%d, %d): %d weight pages lent to KV, %d page "
                "groups (%.1f tokens each) in %.3f s", worker.rank, stage, first, end, freed, groups,
                layout.tokens_per_group, took)
    return _info(worker, layout, groups), {"pages_lent": freed, "seconds": took}


def split(worker):
    """Become whole again: take back pages from the (empty) KV cache, receive the dropped layers
    from the peer stage and send it ours, then rebuild the full KV cache."""
    st: ElasticState = worker.elastic
    start = time.perf_counter()
    worker.kv.close()
    n = st.weights.num_layers
    dropped = [i for i in range(n) if not st.weights.resident(i)]
    taken = st.weights.remap(dropped)
    sync = (lambda: torch.cuda.synchronize(worker.device)) if worker.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    moved = 0
    peer = 1 - st.pair_rank
    # Stage 0 sends first: send/recv pairs match in order on both ends.
    for sender in (0, 1):
        layers = list(range(*stage_layers(n, sender)))
        for i in layers:
            buf = st.weights.layer_bytes(i)
            if st.stage == sender:
                st.pair.send([buf], peer, 100 + i).wait()
            else:
                st.pair.recv([buf], peer, 100 + i).wait()
                moved += buf.numel()
    sync()
    restore_s = time.perf_counter() - t0
    st.stage, st.layers = None, (0, n)
    groups = _new_kv(worker, st, st.full_layout)
    _recapture(worker)
    took = time.perf_counter() - start
    logger.info("rank %d: whole again: %d pages taken back from KV, %.1f MiB of layers received in "
                "%.3f s (%.2f GB/s), %d page groups", worker.rank, taken, moved / 2**20, restore_s,
                moved / max(restore_s, 1e-9) / 1e9, groups)
    return _info(worker, st.full_layout, groups), {"pages_taken": taken, "bytes_received": moved,
                                                   "restore_s": restore_s, "seconds": took}


# ---- the step ---------------------------------------------------------------------------------
def _flag_any(worker, failed: bool) -> bool:
    """Skip together: across this replica's TP ranks, then across the pair."""
    dev = worker.device
    flag = torch.tensor([1.0 if failed else 0.0], device=dev)
    if worker.world_size > 1:
        dist.all_reduce(flag, group=worker.group)
    worker.elastic.pair.allreduce([flag]).wait()
    return bool(flag.item() > 0)


@torch.inference_mode()
def run_stage(worker, plan: StepPlan) -> StepOutput:
    """Apply the plan's KV ops to this stage's cache and run this stage's layers of the batch.

    Stage 0 embeds and sends `[x, residual]` after its last layer; stage 1 receives them, runs the
    rest, the final norm and the LM head, and samples (its rank 0 reports the tokens)."""
    st: ElasticState = worker.elastic
    kv = worker.kv
    failures = kv.wait_prefetch()
    failures += kv.apply(plan.kv_now)
    for new in plan.new_requests:
        worker.requests[new.req_id] = new.sampling
        worker.history.add(new.req_id, new.sampling, new.eos_token_ids)
    tagged = tuple(KVFailure(worker.rank, f.slot, f.num_groups, f.reason) for f in failures)
    if _flag_any(worker, bool(failures)):
        _forget(worker, plan.finished)
        return StepOutput(plan.step, (), tagged, executed=False)
    failures = kv.apply(plan.kv_prefetch)  # synchronously: stages have no step to overlap with
    tagged += tuple(KVFailure(worker.rank, f.slot, f.num_groups, f.reason) for f in failures)
    sampled = ()
    if plan.seqs:
        sampled = _forward(worker, st, kv, plan)
    _forget(worker, plan.finished)
    return StepOutput(plan.step, sampled, tagged, executed=True)


def _forward(worker, st: ElasticState, kv, plan: StepPlan):
    model, first, end = worker.model, st.layers[0], st.layers[1]
    meta = worker.attention.build_metadata(plan.seqs, kv.layout.max_tokens_per_slot, worker.device)
    if any(PREVIOUS_SAMPLE in s.token_ids for s in plan.seqs):
        raise RuntimeError("a pipeline step cannot feed back tokens from the device; plan it after "
                           "the previous step's output is in")
    cos, sin = model.rotary(meta.positions, model.embed_tokens.weight.dtype)
    state = model.backend.prepare(meta)

    def kv_of(layer: int):
        return kv.layer_kv(layer - first)

    peer = 1 - st.pair_rank
    if st.stage == 0:
        x, residual = model.embed_tokens(meta.input_ids), None
    else:
        t, h = meta.input_ids.shape[0], model.hf_config.hidden_size
        both = torch.empty(2, t, h, dtype=model.embed_tokens.weight.dtype, device=worker.device)
        st.pair.recv([both], peer, _HIDDEN_TAG).wait()
        x, residual = both[0], both[1]
    for layer in model.layers[first:end]:
        x, residual = layer(x, residual, cos, sin, meta, state, kv_of)
    if st.stage == 0:
        # Both halves of the residual stream, so stage 1 adds them exactly as one model would.
        st.pair.send([torch.stack([x, residual])], peer, _HIDDEN_TAG).wait()
        return ()
    hidden = model.norm.add_forward(x, residual)[0]
    if meta.sample_indices.numel() == 0:
        return ()
    logits = model.compute_logits(hidden.index_select(0, meta.sample_indices))
    chunks = [s for s in plan.seqs if s.sample]
    params = [worker.requests[c.req_id] for c in chunks]
    worker.history.record_inputs(plan.seqs)
    tokens = worker.sampler.sample_tokens(logits, chunks, params, worker.history)
    worker.history.record_sampled(chunks, tokens)
    if worker.rank != 0:
        return ()
    return worker.sampler.readout(logits, tokens, chunks, params).result()


def _forget(worker, finished) -> None:
    for req_id in finished:
        worker.requests.pop(req_id, None)
    worker.history.forget(finished)


# ---- checks and stats -------------------------------------------------------------------------
def check(worker, expected: dict[int, int] | None = None) -> dict:
    """Integrity of the KV cache, of the page ownership and of every resident layer's bytes."""
    st: ElasticState = worker.elastic
    worker.kv.check_integrity(expected)
    holders = st.weights.holders()
    holders["kv"] = worker.kv._pool.ids()  # the HeldPool `_new_kv` gave this manager
    st.pages.check_integrity(holders)
    st.weights.check_integrity()
    first, end = st.layers
    for i in range(st.weights.num_layers):
        if st.weights.resident(i) != (first <= i < end):
            raise AssertionError(f"layer {i} resident={st.weights.resident(i)} but the worker runs [{first}, {end})")
    return {"pages": st.pages.counts(), "stage": st.stage, "layers": st.layers,
            "kv_groups": worker.kv.num_page_groups}


def memory(worker) -> dict:
    """This rank's device, its weights on pages, its KV cache and (CUDA) the device's memory."""
    st: ElasticState = worker.elastic
    page, counts = st.pages.memory.page_bytes, st.pages.counts()
    out = {"device": str(worker.device), "page_bytes": page, "stage": st.stage,
           "weight_layer_bytes": page * sum(n for h, n in counts.items() if h.startswith("layer.")),
           "kv_bytes": page * counts.get("kv", 0), "kv_page_groups": worker.kv.num_page_groups}
    if worker.device.type == "cuda":
        free, total = torch.cuda.mem_get_info(worker.device)
        out |= {"device_total_bytes": total, "device_free_bytes": free}
    return out


def close(worker) -> None:
    """Release the paged weights and pages (before `Worker.shutdown`)."""
    st: ElasticState | None = getattr(worker, "elastic", None)
    if st is None:
        return
    if worker.kv is not None:
        worker.kv.close()
        worker.kv = None
    worker.graphs = None
    st.weights.close()
    st.pages.close()
    st.pages.memory.close()
    worker.elastic = None

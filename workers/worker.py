"""The per-device worker: loads its shard, owns its KV manager, executes `StepPlan`s.

It decides nothing: it applies the plan's KV ops, runs the batch, and reports what it sampled
(rank 0) and which KV ops it could not apply (any rank). The same class runs in-process (TP=1)
or inside a Ray actor (any TP).

`submit` launches a step and returns at once; `PendingStep.result()` waits for that step's sampled
tokens. Between the two the head plans the next step, whose decodes may feed the tokens sampled
here straight from device memory (`last_sampled`, one entry per slot, updated by every rank: all
ranks sample the same all-gathered logits the same way).

Hot path: `submit` runs once per step.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from dataclasses import dataclass

import torch

from vattn_ray.config import EngineConfig
from vattn_ray.layout import KVLayout
from vattn_ray.sampling_params import SamplingParams
from vattn_ray.scheduler.plan import PREVIOUS_SAMPLE, KVFailure, KVOp, StepOutput, StepPlan
from vattn_ray.transfer import to_device

logger = logging.getLogger(__name__)

DTYPE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GIB = 1 << 30
CPU_DEFAULT_KV_BYTES = 1 * GIB  # host pages are committed only when touched


class PendingStep:
    """A launched step; `result()` waits for its sampled tokens (rank 0) and returns its output."""

    __slots__ = ("step", "failures", "executed", "readout")

    def __init__(self, step: int, failures: tuple[KVFailure, ...], executed: bool = True, readout=None):
        self.step, self.failures, self.executed, self.readout = step, failures, executed, readout

    def result(self) -> StepOutput:
        sampled = self.readout.result() if self.readout is not None else ()
        return StepOutput(self.step, sampled, self.failures, executed=self.executed)


@dataclass(frozen=True)
class WorkerInfo:
    """What a worker reports after start-up; the engine checks that all shards agree."""

    rank: int
    layout: KVLayout
    capacity_groups: int
    weight_bytes: int
    kv_pool_bytes: int
    architecture: str
    device_name: str


class Worker:
    """One shard of the model plus its virtual-memory KV cache."""

    def __init__(self, config: EngineConfig, rank: int = 0, world_size: int = 1,
                 dist_init_method: str | None = None) -> None:
        self.config = config
        self.rank = rank
        self.world_size = world_size
        self.dist_init_method = dist_init_method
        self.dtype = DTYPE[config.model.dtype]
        self.device = torch.device("cpu")
        self.requests: dict[str, SamplingParams] = {}
        self.model = None
        self.kv = None
        self.group = None
        self.cpu_group = None  # gloo: host-side agreement (KV failures) without a device sync
        self.graphs = None
        self.last_sampled = None  # [max_slots] device tensor: each slot's latest sampled token
        self.last_executed = True  # whether the previous plan ran (a plan built on it needs that)
        # Launched steps that may still run on the device: (event after the step, slots it reads
        # and writes). Unmapping a slot's pages waits only for the last of these that uses it.
        self._launched: deque[tuple[torch.cuda.Event, frozenset[int]]] = deque()

    # ---- start-up -------------------------------------------------------------------------
    def init_device(self) -> None:
        """Pick the device and join the process group (NCCL on GPU, gloo on CPU) when TP > 1."""
        if self.config.device == "cuda":
            local = int(os.environ.get("LOCAL_RANK", "0"))
            self.device = torch.device("cuda", local if torch.cuda.device_count() > local else 0)
            torch.cuda.set_device(self.device)
        torch.manual_seed(self.config.model.seed)
        if self.world_size > 1 and not torch.distributed.is_initialized():
            backend = "nccl" if self.config.device == "cuda" else "gloo"
            torch.distributed.init_process_group(backend, init_method=self.dist_init_method,
                                                 rank=self.rank, world_size=self.world_size)
            self.group = torch.distributed.group.WORLD
            self.cpu_group = (torch.distributed.new_group(backend="gloo") if backend == "nccl"
                              else self.group)

    def load(self) -> WorkerInfo:
        """Load this rank's weights, then size and create the KV pool from what memory is left."""
        from vattn_ray.kvcache import KVManager
        from vattn_ray.model import load_model
        from vattn_ray.logits_processors import TokenHistory
        from vattn_ray.sampling import Sampler

        cfg = self.config
        self.model = load_model(cfg.model.model, dtype=self.dtype, device=self.device, rank=self.rank,
                                world_size=self.world_size, attention_backend=cfg.attention_backend)
        weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        if self.world_size > 1:
            self._install_all_reduce()
        layout = KVLayout.build(
            num_layers=self.model.num_layers, layers_per_tensor=cfg.cache.kv_layers_per_tensor,
            num_kv_heads=self.model.num_kv_heads, head_dim=self.model.head_dim,
            itemsize=torch.empty((), dtype=self.dtype).element_size(), page_bytes=cfg.cache.page_bytes,
            max_slots=cfg.scheduler.max_num_seqs, max_model_len=cfg.scheduler.max_model_len)
        budget = self._kv_budget_bytes(layout)
        self.kv = KVManager.from_budget(layout, self.device, budget, self.dtype, rank=self.rank)
        self.sampler = Sampler(seed=cfg.model.seed)
        self.last_sampled = torch.zeros(layout.max_slots, dtype=torch.int64, device=self.device)
        self.history = TokenHistory(layout.max_slots, layout.max_tokens_per_slot, self.device)
        from vattn_ray.attention import get_backend

        self.attention = get_backend(cfg.attention_backend)
        self.graphs = self._capture_decode_graphs() if self._use_graphs() else None
        info = WorkerInfo(self.rank, layout, self.kv.num_page_groups, weight_bytes,
                          self.kv.num_page_groups * layout.page_group_bytes,
                          type(self.model).__name__, str(self.device))
        logger.info("rank %d: weights %.2f GiB, KV pool %.2f GiB = %d page groups of %.1f tokens "
                    "(%d virtual tensors, G=%d), %d slots x %d tokens", self.rank, weight_bytes / GIB,
                    info.kv_pool_bytes / GIB, info.capacity_groups, layout.tokens_per_group,
                    layout.num_tensors, layout.layers_per_tensor, layout.max_slots,
                    layout.max_tokens_per_slot)
        return info

    def _install_all_reduce(self) -> None:
        """The layers' all-reduce: peer-to-peer for step-sized tensors, sized before the KV pool."""
        from vattn_ray.model import comm

        sched = self.config.scheduler
        tokens = max(sched.max_num_batched_tokens, sched.max_num_seqs)
        self.all_reduce = comm.AllReduce(
            self.group, self.device, self.dtype, tokens * self.model.hf_config.hidden_size,
            symm_mem=not self.config.parallel.disable_custom_all_reduce)
        comm.install(self.all_reduce)

    def _use_graphs(self) -> bool:
        # Graphs need fixed input shapes and kernels without host-side branching: FA2 via torch,
        # or the Triton decode kernel (its grid depends on the batch size only).
        return (self.device.type == "cuda" and not self.config.enforce_eager
                and self.config.attention_backend in ("torch", "triton"))

    def _capture_decode_graphs(self):
        from vattn_ray.scheduler.plan import KVOp
        from workers.cuda_graph import DecodeGraphs

        graphs = DecodeGraphs(self.model, self.kv.layer_kv, self.config.scheduler.max_num_seqs,
                              self.kv.layout.max_tokens_per_slot, self.device, self.last_sampled)
        # Capture reads and writes slot 0's first page group; map it for the capture only, so the
        # pool is back in the state the scheduler expects (nothing mapped) afterwards.
        failures = self.kv.apply([KVOp(0, 1)])
        if failures:
            raise RuntimeError(f"cannot map a page group to capture decode graphs: {failures[0].reason}")
        try:
            graphs.capture(lambda: graphs.fill_for_capture(slot=0))
        finally:
            self.kv.apply([KVOp(0, 0)])
        return graphs

    def _kv_budget_bytes(self, layout: KVLayout) -> int:
        cfg = self.config.cache
        if cfg.kv_cache_memory_bytes is not None:
            return int(cfg.kv_cache_memory_bytes)
        if self.device.type != "cuda":
            return CPU_DEFAULT_KV_BYTES
        free, total = torch.cuda.mem_get_info(self.device)
        used = total - free
        budget = int(cfg.gpu_memory_utilization * total) - used - self._activation_reserve()
        if budget < layout.page_group_bytes:
            raise ValueError(
                f"no GPU memory left for the KV cache: {used / GIB:.1f} GiB in use of {total / GIB:.1f} GiB "
                f"at gpu_memory_utilization={cfg.gpu_memory_utilization}; raise gpu_memory_utilization, "
                "lower max_num_batched_tokens, or use more tensor parallelism")
        return budget

    def _activation_reserve(self) -> int:
        """Peak activation bytes of the largest step, estimated from the model's shapes."""
        hf = self.model.hf_config
        tokens = self.config.scheduler.max_num_batched_tokens
        width = (4 * hf.hidden_size + 3 * hf.intermediate_size // self.world_size)
        logits = self.config.scheduler.max_num_seqs * hf.vocab_size * 4 * 3
        return tokens * width * self.dtype.itemsize * 2 + logits + 512 * (1 << 20)

    # ---- the step -------------------------------------------------------------------------
    def execute(self, plan: StepPlan) -> StepOutput:
        """Run one step to completion (`submit` + `result`)."""
        return self.submit(plan).result()

    def submit(self, plan: StepPlan) -> PendingStep:
        """Apply the plan's KV ops, launch its batch and sampling, start the next step's prefetch.

        Returns without waiting for the device."""
        if plan.follows_previous and not self.last_executed:
            # Planned on top of a step that did not run: its positions and fed-back tokens are
            # wrong. The head re-plans once it has seen both outputs (it announces again what
            # this plan carried).
            return PendingStep(plan.step, (), executed=False)
        failures = self.kv.wait_prefetch()
        self._wait_for_slots(self._shrinking(plan.kv_now))
        failures += self.kv.apply(plan.kv_now)
        for new in plan.new_requests:
            self.requests[new.req_id] = new.sampling
            self.history.add(new.req_id, new.sampling, new.eos_token_ids)
        self.last_executed = not self._any_rank_failed(bool(failures))
        if not self.last_executed:
            self._forget(plan.finished)
            return PendingStep(plan.step, self._tag(failures), executed=False)
        readout = None
        if plan.seqs:
            if self.config.cache.enable_prefetch:
                self.kv.prefetch(plan.kv_prefetch)  # mapped on a thread while the GPU computes
            readout = self._run_batch(plan)
            self._note_launched(plan)
            if not self.config.cache.enable_prefetch:
                failures += self.kv.apply(plan.kv_prefetch)
        else:
            failures += self.kv.apply(plan.kv_prefetch)
        self._forget(plan.finished)
        return PendingStep(plan.step, self._tag(failures), readout=readout)

    def _shrinking(self, ops: tuple[KVOp, ...]) -> set[int]:
        """Slots whose pages `ops` unmap (a sharing op may unmap the slot's own groups before it
        maps the shared ones)."""
        return {op.slot for op in ops if op.num_groups < self.kv.mapped_groups(op.slot)
                or (op.share_from >= 0 and self.kv.mapped_groups(op.slot))}

    def _note_launched(self, plan: StepPlan) -> None:
        if self.device.type != "cuda":
            return  # CPU work is done when the step returns
        while self._launched and self._launched[0][0].query():
            self._launched.popleft()
        event = torch.cuda.Event()
        event.record()
        self._launched.append((event, frozenset(s.slot for s in plan.seqs)))

    def _wait_for_slots(self, slots: set[int]) -> None:
        """Wait until no launched step still reads or writes the pages of `slots`.

        Only the last step that uses one of them is waited for (steps complete in launch order on
        the one stream): a reused idle slot, whose request finished steps ago, waits for nothing,
        so the admission that truncates it does not stall the overlap of head and device."""
        if not slots or not self._launched:
            return
        for event, used in reversed(self._launched):
            if used & slots:
                event.synchronize()
                return

    @torch.inference_mode()
    def _run_batch(self, plan: StepPlan):
        self.history.record_inputs(plan.seqs)  # penalties look at every token fed so far
        # One packed host->device copy carries ids, positions, slot mapping and sample rows.
        if self.graphs is not None and self.graphs.fits(plan.seqs):
            logits = self.graphs.run(plan.seqs)  # logits of every row (every decode row samples)
        else:
            meta = self.attention.build_metadata(plan.seqs, self.kv.layout.max_tokens_per_slot, self.device)
            ids = meta.input_ids
            if any(s.token_ids[0] == PREVIOUS_SAMPLE for s in plan.seqs if len(s.token_ids) == 1):
                slots = meta.slot_mapping // self.kv.layout.max_tokens_per_slot
                ids = torch.where(ids < 0, self.last_sampled.index_select(0, slots), ids)
            hidden = self.model(ids, meta.positions, meta, self.kv.layer_kv)
            if meta.sample_indices.numel() == 0:
                return None
            logits = self.model.compute_logits(hidden.index_select(0, meta.sample_indices))
        chunks = [s for s in plan.seqs if s.sample]
        params = [self.requests[c.req_id] for c in chunks]
        # Every rank samples (same logits, same generators, same histories), so each has the tokens
        # that the next step's decodes may feed back without the head in between.
        tokens = self.sampler.sample_tokens(logits, chunks, params, self.history)
        self.last_sampled.index_copy_(0, to_device([c.slot for c in chunks], torch.int64, self.device), tokens)
        self.history.record_sampled(chunks, tokens)
        if self.rank != 0:
            return None
        return self.sampler.readout(logits, tokens, chunks, params)

    def _any_rank_failed(self, failed: bool) -> bool:
        """All shards must agree to skip a step, or the ones that run would wait in a collective.

        A host-side (gloo) all-reduce: a flag on the GPU would queue behind the step still running
        there, and reading it back would wait for that step, so no two steps could overlap."""
        if self.world_size == 1:
            return failed
        flag = torch.tensor([1 if failed else 0], dtype=torch.int32)
        torch.distributed.all_reduce(flag, group=self.cpu_group)
        return bool(flag.item())

    def abort_collectives(self) -> None:
        """After this rank raised mid-step: close its host-side group, so that peers waiting for
        it in the failure agreement (and, on CPU, in any collective) fail at once."""
        if self.world_size > 1 and self.cpu_group is not None and torch.distributed.is_initialized():
            try:
                torch.distributed.destroy_process_group(self.cpu_group)
            except Exception:  # noqa: BLE001 - the group is being abandoned either way
                logger.warning("rank %d: closing the host-side group failed", self.rank, exc_info=True)
            self.cpu_group = None

    def _tag(self, failures: list[KVFailure]) -> tuple[KVFailure, ...]:
        return tuple(KVFailure(self.rank, f.slot, f.num_groups, f.reason) for f in failures)

    def _forget(self, finished: tuple[str, ...]) -> None:
        for req_id in finished:
            self.requests.pop(req_id, None)
        self.history.forget(finished)

    # ---- checks and shutdown ---------------------------------------------------------------
    def check_integrity(self, expected: dict[int, int]) -> None:
        self.kv.join_prefetch()
        self.kv.check_integrity(expected)

    def kv_stats(self, live_tokens: dict[int, int] | None = None):
        self.kv.join_prefetch()
        return self.kv.stats(live_tokens)

    def ping(self) -> int:
        return self.rank

    def shutdown(self) -> None:
        """Release the KV pool, graphs and weights, so the process can build another engine."""
        if self.kv is not None:
            self.kv.wait_prefetch()
            self.kv.close()
            self.kv = None
        self.graphs = self.model = None
        if self.world_size > 1:
            from vattn_ray.model import comm

            comm.install(None)
            self.all_reduce = None
        if self.device.type == "cuda":
            import gc

            gc.collect()
            torch.cuda.empty_cache()  # the caching allocator would keep the weights' memory
        if self.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

"""A tensor-parallel worker group as Ray actors, one per device, in one placement group.

Control path: a Ray compiled graph (shared-memory channels) sends each `StepPlan` to every rank
and brings back each rank's `StepOutput`; a plain actor call costs about a millisecond, the
compiled graph a fraction of that. Other commands (integrity checks, stats) travel through the
same graph so nothing runs on a worker concurrently with a step.

Steps overlap: a rank launches step t+1 *before* it waits for step t's sampled tokens, so the
answer to the command carrying plan t+1 is step t's output (and a `FLUSH` command fetches the
last one when no plan follows). The GPU always has the next step queued while the head takes in
the previous one and plans the one after.

Inside a Ray Serve replica the group uses the replica's own placement group (rank i in bundle i;
the replica sits in bundle 0, see `placement/`; an elastic pair's second group starts at bundle
`bundle_offset` = TP); standalone it creates one and removes it at shutdown.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from vattn_ray.config import EngineConfig
from vattn_ray.executor import Executor, WorkerFailed
from vattn_ray.scheduler.plan import StepOutput, StepPlan

logger = logging.getLogger(__name__)

# NVLink multicast must stay off on the shared GPU hosts; every worker process inherits this.
WORKER_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
STEP_TIMEOUT_S = float(os.environ.get("VATTN_RAY_STEP_TIMEOUT_S", "600"))
PLACEMENT_TIMEOUT_S = 120.0  # standalone: how long to wait for the worker group's resources
PEER_REPORT_S = 5.0  # after one rank failed, how long the others get to report their errors
FLUSH = ("flush", ())  # answered with the output of the step launched last, if not answered yet
# Worker groups may start from several threads at once (an elastic pair starts two): their graphs
# are compiled one at a time.
_COMPILE_LOCK = threading.Lock()


def ensure_ray() -> None:
    """Start (or join) Ray in this process with the workers' environment, unless it is up."""
    import ray

    if not ray.is_initialized():
        ray.init(runtime_env={"env_vars": WORKER_ENV})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class RankRaised(RuntimeError):
    """A rank's exception in a step, tagged with the rank: a compiled graph hands every rank's
    ref the first error of a call, and does not say which actor raised it."""

    def __init__(self, rank: int, error: str) -> None:
        super().__init__(rank, error)
        self.rank, self.error = rank, error

    def __str__(self) -> str:
        return self.error


def _use_assigned_gpu() -> None:
    """Point LOCAL_RANK at the GPU Ray assigned to this actor, among all of the node's GPUs.

    The actors run with RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES, so each sees every GPU of
    the node: peer-to-peer (symmetric-memory) buffers need distinct device indices on the ranks
    of a group, and with one visible GPU each, every rank would be device 0."""
    import ray

    ids = [str(i) for i in ray.get_gpu_ids()]
    if not ids or os.environ.get("RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES") != "1":
        return
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if not visible:
        # Name every GPU explicitly: Ray's compiled graph looks its device up in this variable.
        import torch

        visible = [str(i) for i in range(torch.cuda.device_count())]
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(visible)
    os.environ["LOCAL_RANK"] = str(visible.index(ids[0]) if ids[0] in visible else int(ids[0]))


def _lost_peer(exc: BaseException) -> bool:
    """Whether a rank's error only says that a peer went away (gloo's wording)."""
    text = str(getattr(exc, "cause", None) or exc)
    return "closed by peer" in text or "reset by peer" in text


class _RemoteWorker:
    """The `Worker`, plus what a remote rank needs: its address and a command dispatcher."""

    def __init__(self, config: EngineConfig, rank: int, world_size: int) -> None:
        from workers.worker import Worker

        if config.device == "cuda":
            _use_assigned_gpu()
        self.worker = Worker(config, rank, world_size)
        self.pending = None  # the step launched last, whose output has not been answered yet

    def address(self) -> str:
        import ray

        return f"tcp://{ray.util.get_node_ip_address()}:{_free_port()}"

    def start(self, init_method: str):
        self.worker.dist_init_method = init_method
        self.worker.init_device()
        return self.worker.load()

    def run(self, command):
        """A StepPlan: launch it and answer with the previous step's output (None if already
        answered). `FLUSH`: answer the last step's output. Else (method name or function of the
        worker, args) for calls that are not steps; the head flushes before sending those."""
        if self.worker.device.type == "cuda":
            # The compiled graph calls this on a thread of its own, whose current device would
            # otherwise be device 0: Triton launches on the current device.
            torch.cuda.set_device(self.worker.device)
        try:
            if isinstance(command, StepPlan):
                try:
                    launched = self.worker.submit(command)
                except BaseException:
                    # Peers may be blocked in a collective with this rank: make theirs fail now.
                    self.worker.abort_collectives()
                    raise
                earlier, self.pending = self.pending, launched
                return earlier.result() if earlier is not None else None
            if command == FLUSH:
                earlier, self.pending = self.pending, None
                return earlier.result() if earlier is not None else None
        except Exception as exc:
            raise RankRaised(self.worker.rank, repr(exc)) from exc
        if self.pending is not None:
            raise RuntimeError(f"command {command[0]!r} arrived with a step's output unanswered")
        name, args = command
        if callable(name):
            return name(self.worker, *args)
        return getattr(self.worker, name)(*args)

    def pid(self) -> int:
        return os.getpid()


class _RayStep:
    """A step sent to the ranks. Its output comes back with the next command sent after it."""

    __slots__ = ("executor", "own_refs", "answer_refs", "output")

    def __init__(self, executor: "RayExecutor", own_refs) -> None:
        self.executor = executor
        self.own_refs = own_refs  # the answer to this step's command: the previous step's output
        self.answer_refs = None  # the next command's refs, which carry this step's output
        self.output: StepOutput | None = None

    def result(self) -> StepOutput:
        return self.executor._result(self)


class RayExecutor(Executor):
    """N Ray actors, one per rank; all ranks apply every plan in lockstep."""

    overlaps_steps = True

    def __init__(self, config: EngineConfig, placement_group=None, bundle_offset: int = 0) -> None:
        """`bundle_offset`: rank i goes to bundle `bundle_offset + i` of a given (or the current)
        placement group; a group this executor creates itself starts at bundle 0."""
        super().__init__(config)
        self.bundle_offset = bundle_offset
        # Commands go out and answers come back in one order, from the engine's thread and from
        # callers of stats or checks: one lock keeps each send paired with its answer.
        self._lock = threading.RLock()
        self._unanswered: _RayStep | None = None  # the step sent last, if no command followed it
        self.placement_group = placement_group
        self.owns_placement_group = False
        self.workers = []
        self.pids: list[int] = []
        self.graph = None
        self.use_compiled_graph = os.environ.get("VATTN_RAY_COMPILED_GRAPH", "1") != "0"

    def start(self) -> list:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from placement import bundles_for, check_resources

        tp = self.config.parallel.tensor_parallel_size
        ensure_ray()
        pg = self.placement_group or ray.util.get_current_placement_group()
        if pg is None:
            # Standalone the driver is not in the group: no replica CPU in bundle 0.
            bundles = bundles_for(tp, self.config.device, self.config.parallel.accelerator_type,
                                  replica_cpus=0)
            check_resources(bundles, self.config.parallel.placement_strategy)
            pg = ray.util.placement_group(bundles, strategy=self.config.parallel.placement_strategy)
            # Owned before waiting: if the wait fails, shutdown() must remove the pending group.
            self.placement_group, self.owns_placement_group = pg, True
            try:
                ray.get(pg.ready(), timeout=PLACEMENT_TIMEOUT_S)
            except ray.exceptions.GetTimeoutError:
                raise TimeoutError(f"the worker group's resources {bundles} were not free within "
                                   f"{PLACEMENT_TIMEOUT_S:.0f} s (other work holds them)") from None
        self.placement_group = pg
        offset = 0 if self.owns_placement_group else self.bundle_offset
        gpus = 1 if self.config.device == "cuda" else 0
        actor_cls = ray.remote(_RemoteWorker)
        env = dict(WORKER_ENV)
        if self.config.device == "cuda":
            env["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"] = "1"  # see _use_assigned_gpu
        if os.environ.get("PYTHONPATH"):
            env["PYTHONPATH"] = os.environ["PYTHONPATH"]  # carried packages on the GPU machine
        for rank in range(tp):
            self.workers.append(actor_cls.options(
                num_cpus=0, num_gpus=gpus, runtime_env={"env_vars": env},
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=pg, placement_group_bundle_index=offset + rank),
            ).remote(self.config, rank, tp))
        init_method = ray.get(self.workers[0].address.remote())
        infos = self._get([w.start.remote(init_method) for w in self.workers])
        self.pids = self._get([w.pid.remote() for w in self.workers])
        if self.use_compiled_graph:
            from ray.dag import InputNode, MultiOutputNode

            with _COMPILE_LOCK:
                with InputNode() as command:
                    dag = MultiOutputNode([w.run.bind(command) for w in self.workers])
                self.graph = dag.experimental_compile()
        logger.info("started %d workers (pids %s), compiled graph %s", tp, self.pids,
                    "on" if self.graph is not None else "off")
        return infos

    def _get(self, refs, timeout: float | None = STEP_TIMEOUT_S):
        """Start-up calls: any Ray error becomes a `WorkerFailed` naming the rank."""
        import ray

        try:
            return ray.get(refs, timeout=timeout)
        except ray.exceptions.RayError as exc:
            self.failure = self._describe(exc)
            raise WorkerFailed(self.failure) from exc

    def _send(self, command):
        """Send one command to every rank; returns the refs of their answers."""
        self.check_alive()
        try:
            if self.graph is not None:
                return self.graph.execute(command)  # raises too once Ray has torn the graph down
            return [w.run.remote(command) for w in self.workers]
        except Exception as exc:  # noqa: BLE001 - any Ray error here means the group is gone
            self._fail(exc)

    def _wait(self, refs) -> list:
        """Every rank's answer, in rank order. The first failure poisons the group: a surviving
        rank may be blocked in a collective with the dead one, so nothing is sent to it again.

        Once one rank has failed the others get a few seconds to report too, so that the rank
        that raised is named rather than a peer that lost its connection to it."""
        import ray

        outs, errors = [], []
        for rank, ref in enumerate(refs):
            try:
                outs.append(ray.get(ref, timeout=PEER_REPORT_S if errors else STEP_TIMEOUT_S))
            except ray.exceptions.GetTimeoutError as exc:
                if not errors:
                    self._fail(exc)
                break
            except ray.exceptions.RayError as exc:
                # A compiled graph may answer any rank's ref with another rank's error: name the
                # rank from the error itself where it says.
                named = self._rank_of(exc)
                errors.append((rank if named is None else named, exc))
        if errors:
            rank, exc = next(((r, e) for r, e in errors if not _lost_peer(e)), errors[0])
            self._fail(exc, rank)
        return outs

    def _fail(self, exc: BaseException, rank: int | None = None):
        import ray

        if self.failure is None:
            self.failure = (self._describe(exc, rank) if isinstance(exc, ray.exceptions.RayError)
                            else f"the worker group's control channel failed: {exc!r}")
            logger.error("%s", self.failure)
        raise WorkerFailed(self.failure) from exc

    def _run_all(self, command) -> list:
        """One command that is not a step on every rank, after the last step's output is in."""
        with self._lock:
            self._flush()
            return self._wait(self._send(command))

    def _flush(self) -> None:
        """Fetch the output of the step sent last if no command has followed it yet."""
        step, self._unanswered = self._unanswered, None
        if step is not None:
            step.answer_refs = self._send(FLUSH)
            self._collect(step)

    def _collect(self, step: _RayStep) -> None:
        # In the order sent: this step's own answer (about an earlier step, already taken in or
        # None), then the answer that carries its output.
        if step.own_refs is not None:
            self._wait(step.own_refs)
            step.own_refs = None
        step.output = self._merge(self._wait(step.answer_refs))

    def submit(self, plan: StepPlan) -> _RayStep:
        """Send `plan` to every rank; returns at once (the ranks launch it and answer the step
        before it). Its output arrives with the next command."""
        with self._lock:
            refs = self._send(plan)
            earlier = self._unanswered
            if earlier is not None:  # this command's answer is the earlier step's output
                earlier.answer_refs = refs
                refs = None
            self._unanswered = _RayStep(self, refs)
            return self._unanswered

    def _result(self, step: _RayStep) -> StepOutput:
        with self._lock:
            if step.output is None:
                if step.answer_refs is None:  # nothing sent after it: ask for its output
                    self._flush()
                else:
                    self._collect(step)
            return step.output

    def _describe(self, exc: BaseException, rank: int | None = None) -> str:
        """One line for operators: which rank (and process) failed, and how.

        When a rank dies, its peers blocked in a collective with it fail too (gloo: "connection
        reset"), and their error may reach the head first; so the dead rank is looked for before
        blaming the rank that raised.
        """
        import ray

        if isinstance(exc, ray.exceptions.GetTimeoutError):
            return (f"a tensor-parallel step did not finish in {STEP_TIMEOUT_S:.0f} s "
                    "(VATTN_RAY_STEP_TIMEOUT_S): a worker is stuck")
        named = self._rank_of(exc) if rank is None else rank
        if isinstance(exc, ray.exceptions.RayActorError) and named is not None:
            dead = [named]
        else:
            dead = self._dead_ranks(timeout_s=5.0)
        cause = getattr(exc, "cause", None)
        what = (cause.error if isinstance(cause, RankRaised) else repr(cause)
                if isinstance(exc, ray.exceptions.RayTaskError) and cause
                else f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")
        if not dead:
            return f"tensor-parallel worker {self._who(named)} raised: {what}"
        msg = f"tensor-parallel worker {', '.join(self._who(r) for r in dead)} died"
        if isinstance(exc, ray.exceptions.RayActorError):
            return f"{msg}: {str(exc).strip().splitlines()[0]}"
        return f"{msg} ({self._who(named)} then failed: {what})"

    def _who(self, rank: int | None) -> str:
        if rank is None:
            return "a worker"
        return f"rank {rank} (pid {self.pids[rank] if rank < len(self.pids) else '?'})"

    def _rank_of(self, exc: BaseException) -> int | None:
        """The rank an exception names: tagged by the rank, or by actor id or process id."""
        cause = getattr(exc, "cause", None)
        if isinstance(cause, RankRaised):
            return cause.rank
        ids = [w._actor_id.hex() for w in self.workers]
        actor_id = getattr(exc, "actor_id", None)
        if actor_id in ids:
            return ids.index(actor_id)
        pid = getattr(exc, "pid", None)
        return self.pids.index(pid) if pid in self.pids else None

    def _dead_ranks(self, timeout_s: float) -> list[int]:
        """Ranks whose actors are gone: a call to a dead actor fails as soon as Ray knows it died,
        while a live rank may not answer at all (busy in the graph's loop), hence the time limit."""
        import ray

        pending = {w.pid.remote(): rank for rank, w in enumerate(self.workers)}
        dead: list[int] = []
        deadline = time.monotonic() + timeout_s
        while pending and not dead and (left := deadline - time.monotonic()) > 0:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=left)
            for ref in ready:
                rank = pending.pop(ref)
                try:
                    ray.get(ref, timeout=0)
                except ray.exceptions.RayError:
                    dead.append(rank)
        return sorted(dead)

    def execute(self, plan: StepPlan) -> StepOutput:
        return self.submit(plan).result()

    @staticmethod
    def _merge(outs: list) -> StepOutput:
        """Rank 0's output with every rank's KV failures; executed only if every rank ran it."""
        first = outs[0]
        failures = tuple(f for o in outs for f in o.kv_failures)
        executed = all(o.executed for o in outs)
        if failures == first.kv_failures and executed == first.executed:
            return first
        return StepOutput(first.step, first.sampled if executed else (), failures, executed)

    def check_integrity(self, expected: dict[int, int]) -> None:
        self._run_all(("check_integrity", (expected,)))

    def kv_stats(self, live_tokens: dict[int, int] | None = None):
        return self._run_all(("kv_stats", (live_tokens,)))[0]

    def run_on_workers(self, fn: Callable[..., Any], *args: Any) -> list:
        return self._run_all((fn, args))

    def shutdown(self) -> None:
        import ray

        if self.failure is not None:
            # Kill first: a rank blocked in a collective with a dead peer would hold the graph's
            # teardown (it waits for every rank's loop to stop) for tens of seconds.
            for w in self.workers:
                try:
                    ray.kill(w)
                except Exception:  # noqa: BLE001 - already dead
                    pass
        elif self.workers:
            # Healthy group: each rank releases its KV pool, graphs and weights before it is
            # killed. ray.kill returns before the process is gone, so without this a new engine
            # started right after would still find this one's GPU memory in use.
            try:
                self._run_all(("shutdown", ()))
            except WorkerFailed:
                logger.warning("a worker failed while shutting down", exc_info=True)
        if self.graph is not None:
            try:
                self.graph.teardown()
            except Exception:  # noqa: BLE001 - a dead worker makes teardown fail; go on killing
                logger.warning("compiled graph teardown failed", exc_info=True)
            self.graph = None
        for w in self.workers:
            try:
                ray.kill(w)
            except Exception:  # noqa: BLE001
                pass
        self.workers = []
        if self.owns_placement_group and self.placement_group is not None:
            ray.util.remove_placement_group(self.placement_group)
            self.placement_group = None

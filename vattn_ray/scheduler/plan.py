"""What crosses the head/worker line: a `StepPlan` in, a `StepOutput` out. Nothing else does.

Pure Python dataclasses (picklable, no torch) so they travel cheaply to Ray actors.
After a request's first step only diffs travel: its sampling parameters go once (`NewRequest`),
and a decode step carries the one token the worker itself sampled on the step before.

A plan may be built while the previous one still runs (the head looks one step ahead). A decode
chunk then carries `PREVIOUS_SAMPLE` instead of a token id: the worker feeds the token it sampled
for that slot in the previous step, straight from device memory, so the head never waits for it.
"""

from __future__ import annotations

from dataclasses import dataclass

from vattn_ray.sampling_params import SamplingParams

# A token id the head does not know yet: the one the worker sampled for this slot last step.
PREVIOUS_SAMPLE = -1


@dataclass(frozen=True, slots=True)
class KVOp:
    """After this op, `slot` is backed by exactly `num_groups` page groups (grow, shrink or free).

    With `share_from >= 0` (prefix sharing), those groups are the very page groups backing the
    first `num_groups` groups of slot `share_from`: each physical page is then mapped at both
    virtual ranges, and freed only when its last mapping goes. A slot's groups that already are
    the source's stay; the rest of it is unmapped first.

    Idempotent by construction, so every shard applying the same ops ends in the same state (the
    same slots share the same page groups on every shard).
    """

    slot: int
    num_groups: int
    share_from: int = -1


@dataclass(frozen=True, slots=True)
class NewRequest:
    """Per-request state a worker keeps until the request is in `StepPlan.finished`."""

    req_id: str
    sampling: SamplingParams
    eos_token_ids: tuple[int, ...] = ()  # masked until `sampling.min_tokens` tokens are generated


@dataclass(frozen=True, slots=True)
class SeqChunk:
    """The tokens of one request computed in this step.

    Tokens `token_ids` sit at positions `start .. start+len-1` of the slot; attention sees the
    slot's tokens `[0, start + len)`. `sample` is true for a decode step and for the last chunk of
    a prefill. `num_generated` is how many output tokens the request already has (seeded
    sampling draws from (seed, num_generated), so it is reproducible across preemption).
    `token_mask` (sampling rows of requests with structured output only) is the allowed-token
    bitmask, little-endian int32 words, token i allowed iff bit i % 32 of word i // 32 is set
    (xgrammar's layout); the sampler sets every other logit to -inf. Bytes, so it pickles as is.
    """

    req_id: str
    slot: int
    start: int
    token_ids: tuple[int, ...]
    sample: bool
    num_generated: int = 0
    token_mask: bytes | None = None

    @property
    def end(self) -> int:
        return self.start + len(self.token_ids)


@dataclass(frozen=True, slots=True)
class StepPlan:
    """One step of work, applied identically by every shard.

    Order on a worker: wait for the previous step's prefetch, apply `kv_now` (shrinks before
    grows, as listed), run `seqs`, then apply `kv_prefetch` in the background for the next step.
    """

    step: int
    kv_now: tuple[KVOp, ...] = ()
    kv_prefetch: tuple[KVOp, ...] = ()
    seqs: tuple[SeqChunk, ...] = ()
    new_requests: tuple[NewRequest, ...] = ()
    finished: tuple[str, ...] = ()  # requests whose worker-side state can be dropped
    # Built on top of the previous plan before its output was known (positions, placeholders):
    # a worker skips it (executed=False) if the previous plan did not execute.
    follows_previous: bool = False

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.seqs)


@dataclass(frozen=True, slots=True)
class KVFailure:
    """A KV op a shard could not apply (e.g. its pool is short); the scheduler decides what next."""

    rank: int
    slot: int
    num_groups: int
    reason: str


@dataclass(frozen=True, slots=True)
class SampledToken:
    req_id: str
    token_id: int
    logprob: float | None = None  # log-probability of token_id, when logprobs were asked for
    top_logprobs: tuple[tuple[int, float], ...] | None = None


@dataclass(frozen=True, slots=True)
class StepOutput:
    """What rank 0 returns (sampled tokens) plus what any rank failed to apply.

    `executed` is false when a `kv_now` op failed on some shard: then no shard ran the batch and
    `sampled` is empty; the scheduler re-plans (preempting as needed).
    """

    step: int
    sampled: tuple[SampledToken, ...] = ()
    kv_failures: tuple[KVFailure, ...] = ()
    executed: bool = True

"""Token sampling from a step's logits. HOT PATH (runs on rank 0 every step).

Greedy rows are one batched argmax. Random rows use the exponential race: token = argmax(p / E)
with E ~ Exp(1) i.i.d. per vocabulary entry, which draws exactly from p. The noise of a request
with a `seed` comes from a generator seeded by (seed, number of tokens generated so far), so its
tokens do not depend on which other requests share the batch, nor on preemption and recompute.
Log-probabilities are those of the unmodified model distribution (before temperature/top-k/top-p
and before the logits processing of `vattn_ray.logits_processors`: penalties, bias, min_p).

Nothing here waits for the device: `sample_tokens` returns device tensors and `SampleReadout`
copies them to pinned host memory behind the step's kernels; only `SampleReadout.result()` waits,
and only for its own step, so the head can plan and launch the next step meanwhile. Host-to-device
copies of per-row parameters go through pinned memory for the same reason (a pageable copy would
block).
"""

from __future__ import annotations

from typing import Sequence

import torch

from vattn_ray.logits_processors import TokenHistory, process_logits
from vattn_ray.sampling_params import SamplingParams
from vattn_ray.scheduler.plan import SampledToken, SeqChunk
from vattn_ray.transfer import to_device
from vattn_ray.structured import apply_token_masks

_MASK64 = (1 << 64) - 1
_MIN_TEMPERATURE = 1e-5


def _mix(seed: int, counter: int) -> int:
    """A 63-bit generator seed from (seed, counter) (splitmix64 finaliser: nearby inputs diverge)."""
    z = (seed * 0x9E3779B97F4A7C15 + counter + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


class SampleReadout:
    """One step's sampled tokens (and log-probabilities) on their way to the host."""

    def __init__(self, tokens: torch.Tensor, chunks: Sequence[SeqChunk], logprob_rows: list[int],
                 n_top: list[int], chosen: torch.Tensor | None, top: tuple[torch.Tensor, torch.Tensor] | None):
        cuda = tokens.device.type == "cuda"
        # Copies queued behind the step's kernels; the event marks when they have landed.
        self._tokens = tokens.to("cpu", non_blocking=cuda)
        self._chosen = None if chosen is None else chosen.to("cpu", non_blocking=cuda)
        self._top = None if top is None else tuple(t.to("cpu", non_blocking=cuda) for t in top)
        self._event = None
        if cuda:
            self._event = torch.cuda.Event()
            self._event.record()
        self._chunks, self._rows, self._n_top = list(chunks), logprob_rows, n_top

    def result(self) -> tuple[SampledToken, ...]:
        """Wait for this step's copies only; one `SampledToken` per sampling chunk."""
        if self._event is not None:
            self._event.synchronize()
        token_list = self._tokens.tolist()
        extra: dict[int, tuple[float, tuple[tuple[int, float], ...]]] = {}
        if self._rows:
            chosen = self._chosen.tolist()
            top_vals, top_ids = (t.tolist() for t in self._top)
            for j, i in enumerate(self._rows):
                n = self._n_top[j]
                extra[i] = (chosen[j], tuple(zip(top_ids[j][:n], top_vals[j][:n])))
        out = []
        for i, c in enumerate(self._chunks):
            lp, top = extra.get(i, (None, None))
            out.append(SampledToken(c.req_id, token_list[i], lp, top))
        return tuple(out)


class Sampler:
    """Samples one token per row of `logits`; unseeded requests draw from the sampler's generator."""

    def __init__(self, seed: int = 0) -> None:
        self._seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            g = torch.Generator(device=device)
            g.manual_seed(self._seed)
            self._generators[device] = g
        return self._generators[device]

    def sample(self, logits: torch.Tensor, chunks: Sequence[SeqChunk], params: Sequence[SamplingParams],
               history: TokenHistory | None = None) -> list[SampledToken]:
        """One `SampledToken` per row of `logits [n, V]` (any float dtype), row i belonging to `chunks[i]`.

        `history`: the worker's token history, needed by requests with penalties or min_tokens.
        Waits for the device; the step loop uses `sample_tokens` + `readout` instead."""
        tokens = self.sample_tokens(logits, chunks, params, history)
        return list(self.readout(logits, tokens, chunks, params).result())

    def sample_tokens(self, logits: torch.Tensor, chunks: Sequence[SeqChunk], params: Sequence[SamplingParams],
                      history: TokenHistory | None = None) -> torch.Tensor:
        """Sampled token ids `[n]` (int64, on the logits' device), without waiting for the device.

        `logits` are left as they are (log-probabilities come from them)."""
        n = logits.shape[0]
        if not (n == len(chunks) == len(params)):
            raise ValueError(f"{n} logit rows for {len(chunks)} chunks and {len(params)} params")
        if any(not p.greedy or p.processes_logits for p in params) or any(c.token_mask is not None for c in chunks):
            # Structured output's token masks after the processors; the caller keeps the raw logits.
            logits = apply_token_masks(process_logits(logits.float(), chunks, params, history), chunks)
        tokens = logits.argmax(dim=-1)  # greedy rows keep this; random rows are overwritten below
        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        if random_rows:
            device = logits.device
            rows = to_device(random_rows, torch.int64, device)
            probs = self._filtered_probs(logits[rows], [params[i] for i in random_rows])
            noise = self._exponential_noise(probs.shape, device, [chunks[i] for i in random_rows],
                                            [params[i] for i in random_rows])
            tokens[rows] = (probs / noise).argmax(dim=-1)
        return tokens

    @staticmethod
    def readout(logits: torch.Tensor, tokens: torch.Tensor, chunks: Sequence[SeqChunk],
                params: Sequence[SamplingParams]) -> SampleReadout:
        """Start copying the step's tokens (and requested log-probabilities) to the host."""
        want = [i for i, p in enumerate(params) if p.logprobs is not None]
        chosen = top = None
        n_top = [params[i].logprobs for i in want]
        if want:
            rows = to_device(want, torch.int64, logits.device)
            logprobs = logits[rows].float().log_softmax(dim=-1)
            chosen = logprobs.gather(-1, tokens[rows][:, None])[:, 0]
            k = max(n_top)
            top = logprobs.topk(k, dim=-1) if k > 0 else (logprobs[:, :0], logprobs[:, :0].long())
            top = (top[0], top[1].long())
        return SampleReadout(tokens, chunks, want, n_top, chosen, top)

    def _filtered_probs(self, logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
        """Softmax of logits / temperature restricted to each row's top-k and top-p set."""
        device = logits.device
        temps = to_device([max(float(p.temperature), _MIN_TEMPERATURE) for p in params], torch.float32, device)
        scaled = logits / temps[:, None]
        vocab = scaled.shape[-1]
        top_k = [p.top_k if p.top_k > 0 else vocab for p in params]
        top_p = [float(p.top_p) for p in params]
        if any(k < vocab for k in top_k) or any(p < 1.0 for p in top_p):
            sorted_logits, order = scaled.sort(dim=-1, descending=True)
            rank = torch.arange(vocab, device=device)[None]
            drop = rank >= to_device(top_k, torch.int64, device)[:, None]
            sorted_probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
            mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            drop |= mass_before >= to_device(top_p, torch.float32, device)[:, None]
            drop[:, 0] = False
            scaled = scaled.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
        return scaled.softmax(dim=-1)

    def _exponential_noise(self, shape: torch.Size, device: torch.device, chunks: Sequence[SeqChunk],
                           params: Sequence[SamplingParams]) -> torch.Tensor:
        noise = torch.empty(shape, device=device)
        unseeded = [i for i, p in enumerate(params) if p.seed is None]
        if unseeded:
            rows = to_device(unseeded, torch.int64, device)
            noise[rows] = torch.empty(len(unseeded), shape[1], device=device).exponential_(
                generator=self._generator(device))
        for i, (c, p) in enumerate(zip(chunks, params)):
            if p.seed is not None:  # a per-draw generator: the draw depends on nothing else
                g = torch.Generator(device=device)
                g.manual_seed(_mix(p.seed, c.num_generated))
                noise[i].exponential_(generator=g)
        return noise

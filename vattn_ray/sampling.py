"""Token sampling from a step's logits. HOT PATH (runs on rank 0 every step).

Greedy rows are one batched argmax. Random rows use the exponential race: token = argmax(p / E)
with E ~ Exp(1) i.i.d. per vocabulary entry, which draws exactly from p. The noise of a request
with a `seed` comes from a generator seeded by (seed, number of tokens generated so far), so its
tokens do not depend on which other requests share the batch, nor on preemption and recompute.
Log-probabilities are those of the unmodified model distribution (before temperature/top-k/top-p).
"""

from __future__ import annotations

from typing import Sequence

import torch

from vattn_ray.sampling_params import SamplingParams
from vattn_ray.scheduler.plan import SampledToken, SeqChunk
from vattn_ray.structured import apply_token_masks

_MASK64 = (1 << 64) - 1
_MIN_TEMPERATURE = 1e-5


def _mix(seed: int, counter: int) -> int:
    """A 63-bit generator seed from (seed, counter) (splitmix64 finaliser: nearby inputs diverge)."""
    z = (seed * 0x9E3779B97F4A7C15 + counter + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


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

    def sample(self, logits: torch.Tensor, chunks: Sequence[SeqChunk],
               params: Sequence[SamplingParams]) -> list[SampledToken]:
        """One `SampledToken` per row of `logits [n, V]` (float32), row i belonging to `chunks[i]`."""
        n = logits.shape[0]
        if not (n == len(chunks) == len(params)):
            raise ValueError(f"{n} logit rows for {len(chunks)} chunks and {len(params)} params")
        if n == 0:
            return []
        raw, logits = logits, apply_token_masks(logits, chunks)  # structured output; raw for logprobs
        tokens = logits.argmax(dim=-1)  # greedy rows keep this; random rows are overwritten below
        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        if random_rows:
            rows = torch.tensor(random_rows, device=logits.device)
            probs = self._filtered_probs(logits[rows], [params[i] for i in random_rows])
            noise = self._exponential_noise(probs.shape, logits.device, [chunks[i] for i in random_rows],
                                            [params[i] for i in random_rows])
            tokens[rows] = (probs / noise).argmax(dim=-1)
        return self._outputs(raw, tokens, chunks, params)

    def _filtered_probs(self, logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
        """Softmax of logits / temperature restricted to each row's top-k and top-p set."""
        device = logits.device
        temps = torch.tensor([max(float(p.temperature), _MIN_TEMPERATURE) for p in params], device=device)
        scaled = logits / temps[:, None]
        vocab = scaled.shape[-1]
        top_k = [p.top_k if p.top_k > 0 else vocab for p in params]
        top_p = [float(p.top_p) for p in params]
        if any(k < vocab for k in top_k) or any(p < 1.0 for p in top_p):
            sorted_logits, order = scaled.sort(dim=-1, descending=True)
            rank = torch.arange(vocab, device=device)[None]
            drop = rank >= torch.tensor(top_k, device=device)[:, None]
            sorted_probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
            mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            drop |= mass_before >= torch.tensor(top_p, device=device)[:, None]
            drop[:, 0] = False
            scaled = scaled.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
        return scaled.softmax(dim=-1)

    def _exponential_noise(self, shape: torch.Size, device: torch.device, chunks: Sequence[SeqChunk],
                           params: Sequence[SamplingParams]) -> torch.Tensor:
        noise = torch.empty(shape, device=device)
        unseeded = [i for i, p in enumerate(params) if p.seed is None]
        if unseeded:
            rows = torch.tensor(unseeded, device=device)
            noise[rows] = torch.empty(len(unseeded), shape[1], device=device).exponential_(
                generator=self._generator(device))
        for i, (c, p) in enumerate(zip(chunks, params)):
            if p.seed is not None:  # a per-draw generator: the draw depends on nothing else
                g = torch.Generator(device=device)
                g.manual_seed(_mix(p.seed, c.num_generated))
                noise[i].exponential_(generator=g)
        return noise

    @staticmethod
    def _outputs(logits: torch.Tensor, tokens: torch.Tensor, chunks: Sequence[SeqChunk],
                 params: Sequence[SamplingParams]) -> list[SampledToken]:
        want = [i for i, p in enumerate(params) if p.logprobs is not None]
        token_list = tokens.tolist()
        extra: dict[int, tuple[float, tuple[tuple[int, float], ...]]] = {}
        if want:
            rows = torch.tensor(want, device=logits.device)
            logprobs = logits[rows].log_softmax(dim=-1)
            chosen = logprobs.gather(-1, tokens[rows][:, None])[:, 0].tolist()
            n_top = max(params[i].logprobs for i in want)
            top_vals, top_ids = (logprobs.topk(n_top, dim=-1) if n_top > 0 else (logprobs[:, :0], logprobs[:, :0]))
            top_vals, top_ids = top_vals.tolist(), top_ids.long().tolist()
            for j, i in enumerate(want):
                n = params[i].logprobs
                extra[i] = (chosen[j], tuple(zip(top_ids[j][:n], top_vals[j][:n])))
        out = []
        for i, c in enumerate(chunks):
            lp, top = extra.get(i, (None, None))
            out.append(SampledToken(c.req_id, token_list[i], lp, top))
        return out

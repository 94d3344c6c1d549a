"""Logits processing before sampling: logit_bias, min_tokens, penalties, min_p. HOT PATH.

`process_logits` runs once per step on the rows that sample, after the model and before the
sampler picks tokens (greedy rows included: a penalty changes the argmax too). Log-probabilities
stay those of the unmodified model output, so it returns a new tensor and never writes its input.
When no row uses any of these features it returns its input untouched, so plain sampling costs
nothing more. Every per-row tensor is built once per step from host lists the worker already has;
nothing waits for the device.

Order and meaning follow vLLM:
1. `logit_bias`: the bias is added to the token's logit (OpenAI's meaning).
2. `min_tokens`: until that many tokens are generated, EOS (unless `ignore_eos`) and every
   `stop_token_ids` entry get -inf, so the request cannot stop early.
3. `repetition_penalty` p: every token in the prompt or in the output so far gets logit / p if
   its logit is > 0, else logit * p (transformers' `RepetitionPenaltyLogitsProcessor`).
4. `frequency_penalty` f, `presence_penalty` q: over the *generated* tokens only,
   logit -= f * count + q * (count > 0) (OpenAI's and vLLM's meaning).
5. `min_p` m, at the row's temperature T: tokens whose probability is below m x the top one's are
   dropped, i.e. logit < max_logit + T * ln(m) (transformers' `MinPLogitsWarper` applied after
   temperature). Greedy rows skip it: it never removes the most likely token.

`TokenHistory` is the per-request state this needs on the worker: each tracked request's tokens
by position (prompt chunks as they are fed, then the worker's own samples), kept on the device in
one `[slots, tokens]` buffer allocated on first use. Positions make it exact across chunked
prefill, preemption and recompute (a recomputed position is simply written again).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence

import torch

from vattn_ray.sampling_params import SamplingParams
from vattn_ray.scheduler.plan import SeqChunk
from vattn_ray.transfer import to_device

_MIN_TEMPERATURE = 1e-5  # the sampler's floor for a random row's temperature


def _needs_history(p: SamplingParams) -> bool:
    return p.needs_token_history


class TokenHistory:
    """Tokens of the requests that use penalties, by slot and position, plus every request's EOS ids."""

    def __init__(self, max_slots: int, max_tokens_per_slot: int, device: torch.device) -> None:
        self.max_slots, self.device = max_slots, device
        self.length = max_tokens_per_slot + 1  # the last sampled token sits one past the KV
        self.tokens: torch.Tensor | None = None  # [max_slots, length] int64, allocated on first use
        self.tracked: set[str] = set()  # requests whose tokens are recorded
        self.stop_ids: dict[str, tuple[int, ...]] = {}  # ids masked until min_tokens (min_tokens > 0)

    def add(self, req_id: str, params: SamplingParams, eos_token_ids: Collection[int] = ()) -> None:
        """Start following a request (the worker calls this for every `NewRequest`)."""
        if params.min_tokens:
            eos = () if params.ignore_eos else tuple(eos_token_ids)
            self.stop_ids[req_id] = tuple(sorted(set(eos) | set(params.stop_token_ids)))
        if _needs_history(params):
            self.tracked.add(req_id)
            if self.tokens is None:
                self.tokens = torch.zeros(self.max_slots, self.length, dtype=torch.int64, device=self.device)

    def forget(self, req_ids: Collection[str]) -> None:
        for req_id in req_ids:
            self.tracked.discard(req_id)
            self.stop_ids.pop(req_id, None)

    def record_inputs(self, seqs: Sequence[SeqChunk]) -> None:
        """The tokens this step feeds to the model (ids < 0 are fed from the device: already known)."""
        if not self.tracked:
            return
        rows, cols, vals = [], [], []
        for c in seqs:
            if c.req_id in self.tracked:
                for i, t in enumerate(c.token_ids):
                    if t >= 0:
                        rows.append(c.slot)
                        cols.append(c.start + i)
                        vals.append(t)
        if rows:
            self._write(rows, cols, to_device(vals, torch.int64, self.device))

    def record_sampled(self, chunks: Sequence[SeqChunk], tokens: torch.Tensor | Sequence[int]) -> None:
        """This step's sampled tokens (row i belongs to `chunks[i]`; a device tensor or ids)."""
        if not self.tracked:
            return
        picked = [i for i, c in enumerate(chunks) if c.req_id in self.tracked]
        if not picked:
            return
        tokens = torch.as_tensor(tokens, dtype=torch.int64)
        index = to_device(picked, torch.int64, tokens.device)
        self._write([chunks[i].slot for i in picked], [chunks[i].end for i in picked],
                    tokens.index_select(0, index))

    def _write(self, rows: list[int], cols: list[int], values: torch.Tensor) -> None:
        index = (to_device(rows, torch.int64, self.device), to_device(cols, torch.int64, self.device))
        self.tokens.index_put_(index, values.to(self.device))

    def counts(self, chunks: Sequence[SeqChunk], vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(occurrences of each token in the output so far `[n, V]` float32, whether each token
        occurs in the prompt or the output `[n, V]` bool) for sampling chunks of tracked requests."""
        ends = [c.end for c in chunks]
        width = max(ends)
        slots = to_device([c.slot for c in chunks], torch.int64, self.device)
        end = to_device(ends, torch.int64, self.device)[:, None]
        gen = to_device([c.num_generated for c in chunks], torch.int64, self.device)[:, None]
        tokens = self.tokens.index_select(0, slots)[:, :width]
        pos = torch.arange(width, device=self.device)[None]
        valid = pos < end
        output = valid & (pos >= end - gen)
        # Out-of-range positions scatter into a spare column V that is dropped.
        spare = torch.full_like(tokens, vocab)
        n = len(chunks)
        counts = torch.zeros(n, vocab + 1, device=self.device).scatter_add_(
            1, torch.where(output, tokens, spare), output.float())[:, :vocab]
        seen = torch.zeros(n, vocab + 1, dtype=torch.bool, device=self.device).scatter_(
            1, torch.where(valid, tokens, spare), True)[:, :vocab]
        return counts, seen


def process_logits(logits: torch.Tensor, chunks: Sequence[SeqChunk], params: Sequence[SamplingParams],
                   history: TokenHistory | None) -> torch.Tensor:
    """`logits [n, V]` (float32) with every row's logits processing applied; the input itself when
    no row asks for any. Row i belongs to `chunks[i]` (a sampling chunk) with `params[i]`."""
    rows = [i for i, p in enumerate(params) if p.processes_logits]
    if not rows:
        return logits
    out = logits.clone()
    vocab = out.shape[-1]
    device = out.device
    _bias_and_min_tokens(out, rows, chunks, params, history, vocab)
    hist_rows = [i for i in rows if _needs_history(params[i])]
    if hist_rows:
        if history is None or history.tokens is None:
            raise ValueError("penalties need the worker's TokenHistory")
        _penalties(out, hist_rows, chunks, params, history, vocab)
    min_p_rows = [i for i in rows if params[i].min_p > 0 and not params[i].greedy]
    if min_p_rows:
        index = to_device(min_p_rows, torch.int64, device)
        sub = out.index_select(0, index)
        # log(min_p) * T: the logit gap below the top token that min_p allows.
        gap = to_device([math.log(params[i].min_p) * max(float(params[i].temperature), _MIN_TEMPERATURE)
                   for i in min_p_rows], torch.float32, device)[:, None]
        sub = sub.masked_fill(sub < sub.max(dim=-1, keepdim=True).values + gap, float("-inf"))
        out.index_copy_(0, index, sub)
    return out


def _bias_and_min_tokens(out: torch.Tensor, rows: list[int], chunks: Sequence[SeqChunk],
                         params: Sequence[SamplingParams], history: TokenHistory | None, vocab: int) -> None:
    r, c, v = [], [], []
    for i in rows:
        for token, bias in params[i].logit_bias:
            if token < vocab:  # the engine refuses ids outside the vocabulary; never index past it
                r.append(i)
                c.append(token)
                v.append(bias)
    if r:
        out.index_put_((to_device(r, torch.int64, out.device), to_device(c, torch.int64, out.device)),
                       to_device(v, torch.float32, out.device), accumulate=True)
    r, c = [], []
    for i in rows:
        if chunks[i].num_generated < params[i].min_tokens:
            stop = history.stop_ids.get(chunks[i].req_id, ()) if history is not None else \
                params[i].stop_token_ids
            for token in stop:
                if token < vocab:
                    r.append(i)
                    c.append(token)
    if r:
        out.index_put_((to_device(r, torch.int64, out.device), to_device(c, torch.int64, out.device)),
                       torch.tensor(float("-inf"), device=out.device))


def _penalties(out: torch.Tensor, rows: list[int], chunks: Sequence[SeqChunk],
               params: Sequence[SamplingParams], history: TokenHistory, vocab: int) -> None:
    device = out.device
    index = to_device(rows, torch.int64, device)
    counts, seen = history.counts([chunks[i] for i in rows], vocab)
    sub = out.index_select(0, index)
    rep = to_device([params[i].repetition_penalty for i in rows], torch.float32, device)[:, None]
    penalised = torch.where(sub > 0, sub / rep, sub * rep)
    sub = torch.where(seen, penalised, sub)
    freq = to_device([params[i].frequency_penalty for i in rows], torch.float32, device)[:, None]
    pres = to_device([params[i].presence_penalty for i in rows], torch.float32, device)[:, None]
    sub = sub - freq * counts - pres * (counts > 0).float()
    out.index_copy_(0, index, sub)

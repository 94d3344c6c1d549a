"""Structured output: JSON schema, JSON object, regex, choice and EBNF grammars, through xgrammar.

Head side (`StructuredOutputs`, one per engine): each request's constraint is compiled once per
distinct spec (cached), each sequence gets its own matcher, and when the scheduler builds a plan
`annotate` puts the allowed-token bitmask on every sampling row of such a sequence
(`SeqChunk.token_mask`). After the step, `accept` advances the matcher with the sampled token.
Worker side: the sampler applies `apply_token_masks` to the logits after the logits processors
(the mask travels to every rank in the plan and every rank samples, so the ranks stay identical).
The logits of a CUDA-graph decode step leave the graph before sampling, so masking needs no capture.

The engine-side requirement: the mask of a sequence's next row exists only once its previous token
was accepted by the matcher. So while `needs_sync()` is true (a live sequence has a constraint),
`LLMEngine.step` plans no step ahead of the one in flight; `annotate` refuses a stale mask rather
than send a wrong one.

xgrammar is an optional dependency (``pip install vattn-ray[structured]``); it is imported when the
first constrained request arrives, and its absence is a clear error for that request only.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence

import torch

from vattn_ray.sampling_params import StructuredOutputsParams
from vattn_ray.scheduler.plan import SeqChunk
from vattn_ray.transfer import host_to_device

logger = logging.getLogger(__name__)

_BITS = 32  # tokens per bitmask word
_CACHE_LIMIT = 256  # compiled grammars kept (a compiled JSON schema is typically KiBs to MiBs)


class StructuredOutputs:
    """Compiled grammars, one matcher per constrained sequence, and the per-step token masks."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: Sequence[int]) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = int(vocab_size)
        self.stop_token_ids = [int(t) for t in stop_token_ids]
        self.words = -(-self.vocab_size // _BITS)
        self._compiler = None
        self._compiled: OrderedDict[StructuredOutputsParams, object] = OrderedDict()
        self._lock = threading.Lock()  # compile() may run on a server thread while the loop steps
        self._matchers: dict[str, object] = {}
        self._accepted: dict[str, int] = {}  # tokens each matcher has taken (staleness check)

    # ---- compiling ------------------------------------------------------------------------------
    def compile(self, spec: StructuredOutputsParams):
        """The compiled grammar of `spec` (cached); ValueError naming the problem if it is invalid."""
        with self._lock:
            compiled = self._compiled.get(spec)
            if compiled is not None:
                self._compiled.move_to_end(spec)
                return compiled
        compiled = self._compile(spec)  # outside the lock: compiling a large schema takes a while
        with self._lock:
            self._compiled[spec] = compiled
            while len(self._compiled) > _CACHE_LIMIT:
                self._compiled.popitem(last=False)
        return compiled

    def _compile(self, spec: StructuredOutputsParams):
        compiler = self._get_compiler()
        try:
            kind = spec.kind
            if kind in ("json", "json_object"):  # json_object: any JSON object (OpenAI), not any value
                schema = spec.json if kind == "json" else '{"type": "object"}'
                return compiler.compile_grammar(json_schema_grammar(schema, not spec.disable_any_whitespace))
            if kind == "regex":
                return compiler.compile_regex(spec.regex)
            if kind == "choice":
                return compiler.compile_grammar(choice_grammar(spec.choice))
            return compiler.compile_grammar(spec.grammar)
        except (RuntimeError, ValueError, TypeError) as exc:  # xgrammar reports bad specs this way
            raise ValueError(f"structured output: cannot compile the {spec.kind} constraint: {exc}") from exc

    def _get_compiler(self):
        with self._lock:
            if self._compiler is None:
                try:
                    import xgrammar
                except ImportError as exc:
                    raise ValueError("structured output needs the xgrammar package on the server: "
                                     "pip install 'vattn-ray[structured]'") from exc
                info = xgrammar.TokenizerInfo.from_huggingface(
                    self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.stop_token_ids)
                self._compiler = xgrammar.GrammarCompiler(info, max_threads=2)
            return self._compiler

    # ---- per sequence ---------------------------------------------------------------------------
    def add(self, seq_id: str, spec: StructuredOutputsParams) -> None:
        """Start a matcher for one sequence (compiles `spec` if it is not cached)."""
        import xgrammar

        self._matchers[seq_id] = xgrammar.GrammarMatcher(self.compile(spec))
        self._accepted[seq_id] = 0

    def remove(self, seq_id: str) -> None:
        self._matchers.pop(seq_id, None)
        self._accepted.pop(seq_id, None)

    def needs_sync(self, seq_id: str | None = None) -> bool:
        """Whether the next step of `seq_id` (of any live sequence when None) must wait for the
        previous step's tokens before it is planned: its token mask depends on them."""
        return seq_id in self._matchers if seq_id is not None else bool(self._matchers)

    def accept(self, seq_id: str, token_ids: Sequence[int]) -> str | None:
        """Advance the matcher; "stop" once the grammar has ended (the request must end), "abort"
        if a token broke the grammar (a masking bug, logged), else None."""
        matcher = self._matchers.get(seq_id)
        if matcher is None:
            return None
        for token in token_ids:
            if not matcher.accept_token(int(token)):
                logger.error("structured output: sequence %s sampled token %d that its grammar does not "
                             "allow; ending it", seq_id, token)
                return "abort"
            self._accepted[seq_id] += 1
            if matcher.is_terminated():
                return "stop"
        return None

    # ---- per step -------------------------------------------------------------------------------
    def annotate(self, chunks: tuple[SeqChunk, ...]) -> tuple[SeqChunk, ...]:
        """`chunks` with the token mask set on every sampling row of a constrained sequence."""
        if not self._matchers:
            return chunks
        out = list(chunks)
        for i, chunk in enumerate(chunks):
            matcher = self._matchers.get(chunk.req_id)
            if matcher is None or not chunk.sample:
                continue
            if self._accepted[chunk.req_id] != chunk.num_generated:
                raise RuntimeError(
                    f"structured output: the token mask of {chunk.req_id} is wanted after "
                    f"{chunk.num_generated} tokens but its grammar has seen {self._accepted[chunk.req_id]}; "
                    "plan this step only after the previous one was processed (see needs_sync)")
            out[i] = dataclasses.replace(chunk, token_mask=self._mask(matcher))
        return tuple(out)

    def _mask(self, matcher) -> bytes:
        words = torch.zeros((1, self.words), dtype=torch.int32)
        matcher.fill_next_token_bitmask(words, 0)
        return words.numpy().tobytes()


def json_schema_grammar(schema: str, any_whitespace: bool):
    """xgrammar's grammar of `schema`, with two changes that keep every output parseable:

    - a run of whitespace between JSON tokens holds at most `MAX_WHITESPACE` characters, so a model
      cannot fill max_tokens with blanks (which ends in truncated JSON) yet pretty-printed JSON,
      newline plus deep indentation, still fits;
    - characters of length-limited strings (minLength/maxLength) exclude the control characters
      JSON forbids unescaped (xgrammar 0.2 lets them through there) and accept escapes.
    """
    import xgrammar

    grammar = xgrammar.Grammar.from_json_schema(
        schema, any_whitespace=any_whitespace, max_whitespace_cnt=MAX_WHITESPACE if any_whitespace else None)
    text = str(grammar)
    if _LOOSE_STRING_CHAR in text:
        text = text.replace(_LOOSE_STRING_CHAR, _STRICT_STRING_CHAR)
        grammar = xgrammar.Grammar.from_ebnf(text)
    return grammar


MAX_WHITESPACE = 32
_LOOSE_STRING_CHAR = r'(([^\"\\\r\n]))'
_STRICT_STRING_CHAR = r'(([^\0-\x1f\"\\]) | ("\\" ([\"\\/bfnrt] | "u" [A-Fa-f0-9]{4})))'


def choice_grammar(choices: Sequence[str]) -> str:
    """An EBNF grammar whose language is exactly `choices`."""
    def literal(text: str) -> str:
        escaped = "".join(c if c.isprintable() and c not in '"\\' else _escape(c) for c in text)
        return f'"{escaped}"'
    return "root ::= " + " | ".join(literal(c) for c in choices)


def _escape(c: str) -> str:
    if c in '"\\':
        return "\\" + c
    return f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}"


def apply_token_masks(logits: torch.Tensor, chunks: Sequence[SeqChunk]) -> torch.Tensor:
    """`logits [n, V]` with every disallowed token of a masked row at -inf (a copy when any row is
    masked, so the caller keeps the raw logits for log-probabilities; else `logits` itself).

    HOT PATH (every rank, every step): one host-to-device copy of the packed words, unpacked there;
    copies go through pinned memory so the host never waits for the device here.
    """
    rows = [i for i, c in enumerate(chunks) if c.token_mask is not None]
    if not rows:
        return logits
    packed = bytearray(b"".join(chunks[i].token_mask for i in rows))
    words = host_to_device(torch.frombuffer(packed, dtype=torch.int32).view(len(rows), -1), logits.device)
    shifts = torch.arange(_BITS, dtype=torch.int32, device=logits.device)
    allowed = ((words.unsqueeze(-1) >> shifts) & 1).view(len(rows), -1).bool()
    vocab = logits.shape[-1]
    if allowed.shape[1] < vocab:  # logits wider than the tokenizer's vocabulary: the rest is never allowed
        allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]), value=False)
    index = host_to_device(torch.tensor(rows), logits.device)
    masked = logits.clone()
    masked[index] = logits[index].masked_fill(~allowed[:, :vocab], float("-inf"))
    return masked

"""Per-request sampling parameters (vLLM-compatible names). Pure Python: travels in plans.

Every value is checked here, whoever builds the object (HTTP layer, offline `LLM`, tests): a value
the sampler cannot run (an integer that overflows a tensor, a NaN) must be refused before it
reaches a step, because a step that raises stops the engine for every request, not just this one.
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property

# Integers travel into int64 tensors and C code: keep them well inside that range.
MAX_INT32 = (1 << 31) - 1
SEED_RANGE = (-(1 << 63), (1 << 63) - 1)  # int64, as OpenAI documents `seed`
MAX_LOGIT_BIAS = 100.0  # OpenAI's bound for a logit_bias value
MAX_PENALTY = 2.0  # OpenAI's bound for presence_penalty / frequency_penalty
MAX_REPETITION_PENALTY = 100.0


class RequestOutputKind(enum.IntEnum):
    """What each streamed `RequestOutput` holds (vLLM's meaning)."""

    CUMULATIVE = 0  # everything generated so far, every time
    DELTA = 1  # only what is new since the previous output (cheap for long streams)
    FINAL_ONLY = 2  # one output, when the request finishes (what `LLM.generate` uses)


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one request's output.

    Invalid values raise `ValueError` naming the field, so the HTTP layer can answer 400.
    """

    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0 = all tokens
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    # Logits processing (vattn_ray/logits_processors.py); the defaults change nothing.
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or output
    presence_penalty: float = 0.0  # subtracted once from every token already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence in the generated tokens
    min_p: float = 0.0  # drop tokens less likely than min_p x the most likely one
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    logprobs: int | None = None  # top-n log-probabilities returned per generated token
    n: int = 1
    min_tokens: int = 0
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    structured_outputs: "StructuredOutputsParams | None" = None  # constrain the output (JSON, regex, ...)
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        # Accept lists / a single string / a dict for convenience, store tuples (hashable, immutable).
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(
            _integer("stop_token_ids", t, 0, MAX_INT32) for t in (self.stop_token_ids or ())))
        bias = self.logit_bias or ()
        pairs = bias.items() if isinstance(bias, Mapping) else bias
        biases = {_integer("logit_bias", int(t) if isinstance(t, str) and t.isdigit() else t, 0, MAX_INT32):
                  _real("logit_bias", b, -MAX_LOGIT_BIAS, MAX_LOGIT_BIAS) for t, b in pairs}
        object.__setattr__(self, "logit_bias", tuple(sorted(biases.items())))
        _integer("max_tokens", self.max_tokens, 1, MAX_INT32)
        _real("temperature", self.temperature, 0.0, 100.0)
        if not 0.0 < _real("top_p", self.top_p, 0.0, 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        # Any k >= the vocabulary keeps every token, as -1 does.
        _integer("top_k", self.top_k, -1, MAX_INT32, what="-1 (disabled) or a positive integer")
        if self.seed is not None:
            _integer("seed", self.seed, *SEED_RANGE)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop must be a list of non-empty strings")
        if self.logprobs is not None:
            _integer("logprobs", self.logprobs, 0, 20)
        _integer("n", self.n, 1, MAX_INT32)
        try:
            object.__setattr__(self, "output_kind", RequestOutputKind(self.output_kind))
        except ValueError:
            raise ValueError(f"output_kind must be one of {[k.name for k in RequestOutputKind]}, "
                             f"got {self.output_kind!r}") from None
        _integer("min_tokens", self.min_tokens, 0, self.max_tokens, what="in [0, max_tokens]")
        if not 0.0 < _real("repetition_penalty", self.repetition_penalty, 0.0, MAX_REPETITION_PENALTY):
            raise ValueError(f"repetition_penalty must be in (0, {MAX_REPETITION_PENALTY:g}], "
                             f"got {self.repetition_penalty!r}")
        _real("presence_penalty", self.presence_penalty, -MAX_PENALTY, MAX_PENALTY)
        _real("frequency_penalty", self.frequency_penalty, -MAX_PENALTY, MAX_PENALTY)
        _real("min_p", self.min_p, 0.0, 1.0)
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise ValueError("structured_outputs must be a StructuredOutputsParams, got "
                             f"{type(self.structured_outputs).__name__}")

    def check_vocab(self, vocab_size: int) -> None:
        """Token ids this request names must exist in the model's vocabulary (the engine knows it)."""
        for name, ids in (("stop_token_ids", self.stop_token_ids), ("logit_bias", [t for t, _ in self.logit_bias])):
            bad = [t for t in ids if t >= vocab_size]
            if bad:
                raise ValueError(f"{name} has token id {bad[0]}, outside the vocabulary [0, {vocab_size})")

    @cached_property
    def processes_logits(self) -> bool:
        """Whether the sampler must change this request's logits (penalties, bias, min_p, ...)."""
        return bool(self.repetition_penalty != 1.0 or self.presence_penalty or self.frequency_penalty
                    or self.min_p or self.logit_bias or self.min_tokens)

    @property
    def needs_token_history(self) -> bool:
        """Whether penalties read the request's earlier tokens on the worker (prompt and output)."""
        return bool(self.repetition_penalty != 1.0 or self.presence_penalty or self.frequency_penalty)

    @property
    def greedy(self) -> bool:
        return float(self.temperature) == 0.0


def _integer(name: str, value, low: int, high: int, what: str | None = None) -> int:
    """`value` if it is an int (not a bool) in [low, high], else a ValueError naming `name`."""
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{name} must be {what or f'an integer in [{low}, {high}]'}, got {value!r}")
    return value


def _real(name: str, value, low: float, high: float) -> float:
    """`value` as a float if it is a finite number in [low, high], else a ValueError naming `name`."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) \
            or not low <= value <= high:
        raise ValueError(f"{name} must be a finite number in [{low:g}, {high:g}], got {value!r}")
    return float(value)


@dataclass(frozen=True)
class StructuredOutputsParams:
    """What the output must match (vLLM's names); exactly one of the constraints is set.

    `json` is a JSON schema (a dict or its JSON text), `json_object` any JSON object (OpenAI's
    ``response_format: {"type": "json_object"}``), `regex` a regular expression, `choice` one of a
    list of strings, `grammar` an EBNF grammar (GBNF syntax). The schema is kept as canonical JSON
    text, so equal schemas share one compiled grammar and the params stay hashable.
    """

    json: str | dict | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    disable_any_whitespace: bool = False  # JSON without free whitespace between tokens

    def __post_init__(self) -> None:
        if isinstance(self.json, dict):
            object.__setattr__(self, "json", _canonical_json(self.json))
        elif isinstance(self.json, str):
            try:
                object.__setattr__(self, "json", _canonical_json(json.loads(self.json)))
            except ValueError as exc:
                raise ValueError(f"structured_outputs.json is not valid JSON: {exc}") from exc
        elif self.json is not None:
            raise ValueError("structured_outputs.json must be a JSON schema (an object or its JSON text)")
        if self.choice is not None:
            if isinstance(self.choice, str) or not all(isinstance(c, str) and c for c in self.choice) \
                    or not self.choice:
                raise ValueError("structured_outputs.choice must be a non-empty list of non-empty strings")
            object.__setattr__(self, "choice", tuple(self.choice))
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string")
        kinds = [k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None]
        kinds += ["json_object"] if self.json_object else []
        if len(kinds) != 1:
            raise ValueError("structured_outputs needs exactly one of json, json_object, regex, choice, "
                             f"grammar; got {kinds or 'none'}")

    @property
    def kind(self) -> str:
        """Which constraint is set: "json", "json_object", "regex", "choice" or "grammar"."""
        if self.json_object:
            return "json_object"
        return next(k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None)


def _canonical_json(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)

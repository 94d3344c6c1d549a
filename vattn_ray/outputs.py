"""Request outputs (vLLM-compatible shapes): what `LLM.generate` returns and the async engine streams."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    """One generated sequence. `text`/`token_ids` are cumulative; `delta_*` is what is new since
    the previous streamed output of the same request."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    cumulative_logprob: float | None = None
    # One entry per generated token: {token_id: logprob} holding the sampled token and the top-n.
    logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: str | int | None = None  # the stop string or stop token that ended it
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    metrics: dict = field(default_factory=dict)  # arrival/first-token/finish times (time.monotonic)
    # Prompt tokens served from the prefix cache (a whole number of page groups); with n > 1, those
    # of the first sequence (the others share its prompt's pages).
    num_cached_tokens: int = 0

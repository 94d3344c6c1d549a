"""The offline API, shaped like vLLM's so users can switch without rewriting.

    from vattn_ray import LLM, SamplingParams
    llm = LLM(model="/path/to/hf-checkpoint")
    outs = llm.generate(["Hello"], SamplingParams(max_tokens=32, temperature=0))
    print(outs[0].outputs[0].text)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from vattn_ray.chat import Message, apply_chat_template
from vattn_ray.config import EngineArgs
from vattn_ray.engine import LLMEngine
from vattn_ray.outputs import RequestOutput
from vattn_ray.sampling_params import RequestOutputKind, SamplingParams

Prompt = str | list[int]


class LLM:
    """Generate from a local Hugging Face checkpoint with a demand-paged virtual-memory KV cache."""

    def __init__(self, model: str, tensor_parallel_size: int = 1, device: str = "auto",
                 dtype: str = "auto", max_model_len: int | None = None, max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 2048, gpu_memory_utilization: float = 0.9,
                 kv_layers_per_tensor: int | str = "auto", seed: int = 0, **kwargs) -> None:
        args = EngineArgs(model=model, tensor_parallel_size=tensor_parallel_size, device=device,
                          dtype=dtype, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                          max_num_batched_tokens=max_num_batched_tokens,
                          gpu_memory_utilization=gpu_memory_utilization,
                          kv_layers_per_tensor=kv_layers_per_tensor, seed=seed, **kwargs)
        self.engine = LLMEngine.from_engine_args(args)
        self._counter = 0

    def get_tokenizer(self):
        return self.engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the checkpoint's generation_config.json defaults (see startup.py)."""
        return SamplingParams(**self.engine.config.model.sampling_defaults)

    def chat(self, messages: Sequence[Message] | Sequence[Sequence[Message]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = False, *, chat_template: str | None = None, add_generation_prompt: bool = True,
             continue_final_message: bool = False,
             chat_template_kwargs: Mapping[str, Any] | None = None) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of ``{"role", "content"}`` messages) or to
        a list of conversations, rendered with the checkpoint's chat template; see `generate`."""
        if not messages:
            raise ValueError("messages is empty; send at least one message")
        conversations = [messages] if isinstance(messages[0], Mapping) else list(messages)
        rendered = [apply_chat_template(self.get_tokenizer(), conv, add_generation_prompt=add_generation_prompt,
                                        continue_final_message=continue_final_message,
                                        chat_template=chat_template, chat_template_kwargs=chat_template_kwargs)
                    for conv in conversations]
        outs = self.generate([ids for _, ids in rendered], sampling_params, use_tqdm)
        for out, (text, _) in zip(outs, rendered):
            out.prompt = text
        return outs

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in the order of `prompts`.

        `prompts`: a string, a list of token ids, or a list of either. Without `sampling_params`
        the checkpoint's generation_config.json defaults apply (`get_default_sampling_params`).
        """
        prompt_list = _as_prompt_list(prompts)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        params = ([sampling_params] * len(prompt_list) if isinstance(sampling_params, SamplingParams)
                  else list(sampling_params))
        if len(params) != len(prompt_list):
            raise ValueError(f"got {len(params)} sampling_params for {len(prompt_list)} prompts")
        ids: list[str] = []
        done: dict[str, RequestOutput] = {}
        bar = _progress(len(prompt_list)) if use_tqdm else None
        try:
            # Inside the try: if a prompt is refused, the ones admitted before it are aborted too.
            for prompt, p in zip(prompt_list, params):
                ids.append(f"offline-{self._counter}")
                self._counter += 1
                # Only the final output is needed: no per-step copies of growing outputs.
                p = dataclasses.replace(p, output_kind=RequestOutputKind.FINAL_ONLY)
                self.engine.add_request(ids[-1], prompt, p)
            while len(done) < len(ids):
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            for request_id in ids:
                if request_id not in done:
                    self.engine.abort_request(request_id)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [done[i] for i in ids]

    def shutdown(self) -> None:
        self.engine.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _as_prompt_list(prompts) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) and not isinstance(t, bool) for t in prompts):
        return [prompts]  # a single prompt given as token ids
    return prompts


def _progress(total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc="generate", unit="req")

"""The head's host work per step: what the step loop spends outside the model, per running sequence.

    python -m vattn_ray.bench head [--model builtin:tiny-llama --device cpu --batch 128] --out head.json

Admits --batch streaming requests (DELTA outputs, greedy, `ignore_eos`, --prompt-len in,
--output-len out), serves them to the end --rounds times after one round of warm-up, and times
`LLMEngine.process` (scheduler update, detokenising, stop strings, building the outputs) at every
step. Then it times the incremental detokeniser alone per token, through `tokenizers`' DecodeStream
and through the tokenizer's `decode` (the window decode), on the same generated tokens; with
--window-decode the engine itself decodes the window way, for the step time without DecodeStream.
When serving is host-bound these are what a step costs beyond the GPU's time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from vattn_ray.bench.provenance import versions
from vattn_ray.config import EngineArgs
from vattn_ray.detokenizer import IncrementalDetokenizer, stream_backend
from vattn_ray.engine import LLMEngine
from vattn_ray.sampling_params import RequestOutputKind, SamplingParams


def measure(engine: LLMEngine, batch: int, prompt_len: int, output_len: int, rounds: int) -> dict:
    """Per-step `process` times (ms) of `rounds` rounds of `batch` requests, after one of warm-up."""
    times: list[float] = []
    process = engine.process

    def timed(plan, out):
        t0 = time.perf_counter()
        result = process(plan, out)
        times.append((time.perf_counter() - t0) * 1e3)
        return result

    engine.process = timed
    generated = []
    try:
        for r in range(rounds + 1):
            if r == 1:
                times.clear()  # round 0 warms up
            params = SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=0.0,
                                    output_kind=RequestOutputKind.DELTA)
            for i in range(batch):
                engine.add_request(f"head-{r}-{i}", [(7 + 31 * i + j) % engine.vocab_size for j in range(prompt_len)],
                                   params)
            outs: dict[str, list[int]] = {}
            while engine.has_unfinished_requests():
                for o in engine.step():
                    outs.setdefault(o.request_id, []).extend(o.outputs[0].token_ids)
            generated = list(outs.values())
    finally:
        engine.process = process
    return {"process_ms": _summary(times), "steps": len(times), "generated": generated}


def detok_us_per_token(tokenizer, sequences: list[list[int]], stream: bool) -> float:
    backend = stream_backend(tokenizer) if stream else None
    t0 = time.perf_counter()
    for ids in sequences:
        d = IncrementalDetokenizer(tokenizer, backend=backend)
        for t in ids:
            d.add([t])
        d.flush()
    return (time.perf_counter() - t0) / max(1, sum(map(len, sequences))) * 1e6


def _summary(xs: list[float]) -> dict:
    xs = sorted(xs)
    return {"mean": statistics.fmean(xs), "p50": xs[len(xs) // 2], "p90": xs[int(len(xs) * 0.9)]} if xs else {}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vattn_ray.bench head", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:tiny-llama")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--window-decode", action="store_true", help="the engine decodes without DecodeStream")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    engine = LLMEngine.from_engine_args(EngineArgs(
        model=args.model, device=args.device, max_num_seqs=args.batch,
        max_model_len=args.prompt_len + args.output_len + 16,
        max_num_batched_tokens=max(2048, args.batch * args.prompt_len)))
    if args.window_decode:
        engine.detok_backend = None
    try:
        m = measure(engine, args.batch, args.prompt_len, args.output_len, args.rounds)
        seqs = m.pop("generated")
        report = {
            "config": vars(args),
            "process_ms_per_step": m["process_ms"], "steps": m["steps"],
            "process_us_per_sequence": m["process_ms"]["p50"] * 1e3 / args.batch,
            "detok_us_per_token": {"decode_stream": detok_us_per_token(engine.tokenizer, seqs, True),
                                   "window_decode": detok_us_per_token(engine.tokenizer, seqs, False)},
            "decode_stream_used": engine.detok_backend is not None,
            "provenance": {"versions": versions()},
        }
    finally:
        engine.shutdown()
    text = json.dumps(report, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0

"""Offline throughput: vattn-ray vs transformers on the same checkpoint, in one run.

    python -m vattn_ray.bench throughput --model /path/ckpt --num-requests 256 \
        --input-len 1024 --output-len 256 --out results/throughput.json

Systems (all greedy, ignoring EOS so every request makes exactly --output-len tokens):
  vattn      this engine (virtual-memory KV cache, torch FlashAttention-2 varlen on GPU)
  hf         transformers `generate`, static batches of --hf-batch prompts (dynamic cache, sdpa)
  hf-cb      transformers continuous batching (`generate_batch`, paged cache), if available
Also reports the decode step time of vattn against the roofline: (weight bytes + KV bytes read
per step) / measured HBM bandwidth (a device-to-device copy, bytes read + written).
During the vattn run the engine's KV statistics are sampled every --stats-interval seconds
(`kv_timeline`: page groups mapped / free / idle, running / waiting requests); --plot draws them.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import time

import torch

logger = logging.getLogger(__name__)
GIB = 1 << 30


def measure_copy_bandwidth(device: torch.device, nbytes: int = 2 * GIB) -> float:
    """Bytes/s of a large device copy, counting bytes read and written (HBM's practical limit)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    _sync(device)
    reps = 10
    t = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    _sync(device)
    return 2 * nbytes * reps / (time.perf_counter() - t)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _used_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    free, total = torch.cuda.mem_get_info(device)
    return total - free


def make_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab - 10) for _ in range(length)] for _ in range(n)]


def run_vattn(args, prompts: list[list[int]]) -> dict:
    """Drive the engine step by step so decode-only steps can be timed on their own."""
    from vattn_ray import LLM, SamplingParams

    llm = LLM(model=args.model, dtype=args.dtype, device=args.device, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
              gpu_memory_utilization=args.gpu_memory_utilization,
              kv_layers_per_tensor=args.kv_layers_per_tensor)
    engine = llm.engine
    device = _device(args)
    params = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))  # warm-up
    for i, p in enumerate(prompts):
        engine.add_request(f"bench-{i}", p, params)
    decode_steps: list[tuple[float, int, int]] = []  # (seconds, batch, tokens of context read)
    out_tokens = 0
    extra: dict = {}
    timeline: list[dict] = []
    _sync(device)
    t0 = time.perf_counter()
    next_sample = t0
    while engine.has_unfinished_requests():
        if time.perf_counter() >= next_sample:  # between steps: the books are exact there
            timeline.append(_kv_sample(engine, time.perf_counter() - t0))
            next_sample += args.stats_interval
        plan = engine.schedule()
        if plan is None:
            continue
        decode_only = bool(plan.seqs) and all(len(s.token_ids) == 1 for s in plan.seqs)
        if args.profile and decode_only and len(decode_steps) == 20 and "profile" not in extra:
            out, extra["profile"] = _profiled(engine, plan)  # this step is left out of the timings
            engine.process(plan, out)
            continue
        ts = time.perf_counter()
        out = engine.executor.execute(plan)
        dt = time.perf_counter() - ts  # execute returns after sampling: the step is complete
        for o in engine.process(plan, out):
            if o.finished:
                out_tokens += len(o.outputs[0].token_ids)
        if decode_only:
            decode_steps.append((dt, len(plan.seqs), sum(s.end for s in plan.seqs)))
    elapsed = time.perf_counter() - t0
    timeline.append(_kv_sample(engine, elapsed))
    peak = _used_bytes(device)
    weight_bytes = sum(p.numel() * p.element_size() for p in _model(engine).parameters())
    embed_bytes = _embedding_bytes(engine)
    layout = engine.layout
    kv_bytes_per_token = layout.token_bytes * layout.num_tensors  # K and V of every layer
    full = [s for s in decode_steps if s[1] == max(b for _, b, _ in decode_steps)] if decode_steps else []
    result = {
        "system": args.label, "kv_layers_per_tensor": layout.layers_per_tensor, **extra, "requests": len(prompts), "output_tokens": out_tokens, "seconds": elapsed,
        "output_tokens_per_s": out_tokens / elapsed, "device_memory_in_use_gib": peak / GIB,
        "weight_bytes": weight_bytes,
        "kv_pool_gib": engine.executor.worker.kv.num_page_groups * layout.page_group_bytes / GIB,
        "num_preemptions": engine.stats().get("num_preemptions"), "decode_steps": len(decode_steps),
        "kv_timeline": timeline,
    }
    if full:
        med = statistics.median(s[0] for s in full)
        ctx = statistics.median(s[2] for s in full)
        result.update({
            "decode_batch": full[0][1], "decode_step_ms_median": med * 1e3,
            "decode_context_tokens_median": ctx,
            "bytes_read_per_decode_step": weight_bytes - embed_bytes + ctx * kv_bytes_per_token,
        })
    llm.shutdown()
    return result


def _kv_sample(engine, t: float) -> dict:
    s = engine.stats()
    return {"t": round(t, 4), **{k: s[k] for k in ("num_running", "num_waiting", "num_groups_mapped",
                                                   "num_groups_free", "num_groups_idle", "kv_fragmentation")}}


def _profiled(engine, plan):
    """One step under torch.profiler: where the decode step's GPU time goes, by kernel."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        out = engine.executor.execute(plan)
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60)
    print(table)
    return out, table


def _model(engine):
    return engine.executor.worker.model


def _embedding_bytes(engine) -> int:
    """The embedding table is gathered by row, not streamed: leave it out of the roofline."""
    model = _model(engine)
    emb = getattr(getattr(model, "model", model), "embed_tokens", None)
    if emb is None or getattr(model.hf_config, "tie_word_embeddings", False):
        return 0
    return sum(p.numel() * p.element_size() for p in emb.parameters())


def _device(args) -> torch.device:
    if args.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(args.device)


def _load_hf(args, device: torch.device):
    """The same checkpoint through transformers' own loader (sdpa attention, bench dtype)."""
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, args.dtype if args.dtype != "auto" else "bfloat16")
    return AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation="sdpa").to(device).eval()


def run_hf(args, prompts: list[list[int]]) -> dict:
    device = _device(args)
    model = _load_hf(args, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    kw = dict(max_new_tokens=args.output_len, min_new_tokens=args.output_len, do_sample=False)
    with torch.no_grad():
        model.generate(torch.tensor(prompts[:1], device=device), max_new_tokens=4, do_sample=False)
        _sync(device)
        t0 = time.perf_counter()
        out_tokens = 0
        for i in range(0, len(prompts), args.hf_batch):
            batch = torch.tensor(prompts[i:i + args.hf_batch], device=device)
            seq = model.generate(batch, attention_mask=torch.ones_like(batch), **kw)
            out_tokens += (seq.shape[1] - batch.shape[1]) * batch.shape[0]
        _sync(device)
        elapsed = time.perf_counter() - t0
    result = {"system": f"hf generate (batch {args.hf_batch})", "requests": len(prompts),
              "output_tokens": out_tokens, "seconds": elapsed, "output_tokens_per_s": out_tokens / elapsed,
              "device_memory_in_use_gib": _used_bytes(device) / GIB,
              "peak_allocated_gib": torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None}
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def run_hf_cb(args, prompts: list[list[int]]) -> dict:
    from transformers import GenerationConfig

    device = _device(args)
    model = _load_hf(args, device)
    if not hasattr(model, "generate_batch"):
        return {"system": "hf continuous batching", "error": "this transformers has no generate_batch"}
    cfg = GenerationConfig(max_new_tokens=args.output_len, do_sample=False, eos_token_id=-1)
    model.generate_batch(inputs=prompts[:2], generation_config=GenerationConfig(max_new_tokens=4, do_sample=False, eos_token_id=-1))
    _sync(device)
    t0 = time.perf_counter()
    outs = model.generate_batch(inputs=prompts, generation_config=cfg)
    _sync(device)
    elapsed = time.perf_counter() - t0
    out_tokens = sum(len(o.generated_tokens) for o in outs.values())
    result = {"system": "hf continuous batching (generate_batch)", "requests": len(prompts),
              "output_tokens": out_tokens, "seconds": elapsed, "output_tokens_per_s": out_tokens / elapsed,
              "device_memory_in_use_gib": _used_bytes(device) / GIB}
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vattn_ray.bench throughput", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:tiny-llama")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--max-model-len", type=int, default=None)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--kv-layers-per-tensor", default="auto")
    ap.add_argument("--hf-batch", type=int, default=64)
    ap.add_argument("--systems", default="vattn,hf,hf-cb", help="comma list of vattn, vattn-g1, hf, hf-cb")
    ap.add_argument("--profile", action="store_true", help="print a kernel breakdown of one decode step")
    ap.add_argument("--out", default=None)
    ap.add_argument("--plot", default=None, help="draw the report's figures into this file (matplotlib)")
    ap.add_argument("--stats-interval", type=float, default=0.05, help="seconds between KV samples")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from vattn_ray.config import read_hf_config, resolve_model_path

    args.model = resolve_model_path(args.model)
    if args.max_model_len is None:
        args.max_model_len = args.input_len + args.output_len
    if args.kv_layers_per_tensor != "auto":
        args.kv_layers_per_tensor = int(args.kv_layers_per_tensor)
    vocab = int(read_hf_config(args.model)["vocab_size"])
    prompts = make_prompts(args.num_requests, args.input_len, vocab)
    device = _device(args)
    report: dict = {"config": vars(args).copy(), "results": []}
    if device.type == "cuda":
        report["device"] = torch.cuda.get_device_name(device)
        report["hbm_copy_bytes_per_s"] = measure_copy_bandwidth(device)
    runners = {"vattn": run_vattn, "vattn-g1": run_vattn, "hf": run_hf, "hf-cb": run_hf_cb}
    for name in args.systems.split(","):
        try:
            sys_args = argparse.Namespace(**vars(args), label=name)
            if name == "vattn-g1":  # one layer per virtual tensor: the contiguous layout, for comparison
                sys_args.kv_layers_per_tensor = 1
            report["results"].append(runners[name](sys_args, prompts))
        except Exception as exc:  # noqa: BLE001 - one baseline failing must not lose the others
            logger.exception("%s failed", name)
            report["results"].append({"system": name, "error": f"{type(exc).__name__}: {exc}"})
        if device.type == "cuda":
            torch.cuda.empty_cache()
        _finish(report)
        if args.out:  # after every system, so a slow baseline cut short loses nothing before it
            with open(args.out, "w") as f:
                json.dump(report, f, indent=2)
    if args.plot:
        from vattn_ray.bench.plots import plot_throughput

        plot_throughput(report, args.plot)
    print(render(report))
    return 0


def _finish(report: dict) -> None:
    ours = next((r for r in report["results"] if r.get("system") == "vattn" and "error" not in r), None)
    bw = report.get("hbm_copy_bytes_per_s")
    for r in report["results"]:
        if ours and "output_tokens_per_s" in r:
            r["ratio_vs_vattn"] = r["output_tokens_per_s"] / ours["output_tokens_per_s"]
        if bw and "decode_step_ms_median" in r:
            r["roofline_step_ms"] = r["bytes_read_per_decode_step"] / bw * 1e3
            r["roofline_fraction"] = r["roofline_step_ms"] / r["decode_step_ms_median"]


def render(report: dict) -> str:
    lines = ["| system | output tok/s | ratio to vattn | seconds | device mem in use (GiB) |",
             "|---|---:|---:|---:|---:|"]
    for r in report["results"]:
        if "error" in r:
            lines.append(f"| {r['system']} | error: {r['error'][:80]} | | | |")
            continue
        lines.append(f"| {r['system']} | {r['output_tokens_per_s']:.0f} | {r.get('ratio_vs_vattn', 1):.2f} | "
                     f"{r['seconds']:.1f} | {r['device_memory_in_use_gib']:.1f} |")
    for r in report["results"]:
        if "decode_step_ms_median" not in r:
            continue
        line = (f"{r['system']}: decode step (batch {r['decode_batch']}, {r['decode_context_tokens_median']:.0f} "
                f"context tokens in the batch) {r['decode_step_ms_median']:.2f} ms")
        if "roofline_step_ms" in r:
            line += (f"; roofline at {report['hbm_copy_bytes_per_s'] / 1e12:.2f} TB/s {r['roofline_step_ms']:.2f} ms "
                     f"= {100 * r['roofline_fraction']:.0f}% of the bandwidth limit")
        lines.append(line)
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())

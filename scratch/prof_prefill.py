import sys, time, torch
from torch.profiler import profile, ProfilerActivity
from vattn_ray import LLM, SamplingParams
import random
llm = LLM(model="/tmp/l8b", dtype="bfloat16", max_num_seqs=256, max_num_batched_tokens=8192, max_model_len=8200)
eng = llm.engine
rng = random.Random(0)
def prompts(n, L): return [[rng.randrange(10, 120000) for _ in range(L)] for _ in range(n)]
p1 = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
llm.generate(prompts(2, 64), p1)
for name, ps in (("8x1024", prompts(8, 1024)), ("1x8192", prompts(1, 8192))):
    llm.generate(ps, p1)  # warm
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(3): llm.generate(ps, p1)
    torch.cuda.synchronize(); dt = (time.perf_counter() - t) / 3
    print(f"== {name}: {dt*1e3:.1f} ms per generate (one 8192-token step)", flush=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        llm.generate(ps, p1); torch.cuda.synchronize()
    ev = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    ev.sort(key=lambda e: -e.self_device_time_total)
    tot = sum(e.self_device_time_total for e in ev)
    print(f"   GPU total {tot/1e3:.1f} ms")
    for e in ev[:14]:
        print(f"   {e.self_device_time_total/1e3:8.2f} ms {e.count:5d}  {e.key[:100]}")
llm.shutdown()

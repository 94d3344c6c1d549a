#!/usr/bin/env bash
# Elastic memory on a 2-GPU machine in one bounded call: the GPU tests, the random 32B-shaped
# checkpoint, then the bursty benchmark with and without elasticity (restore time included).
# Usage: bash vattn_ray/bench/gpu_elastic.sh OUT_DIR     (Ray importable, e.g. PYTHONPATH=/tmp/site:$PWD)
# The whole call ends within $VATTN_ELASTIC_BUDGET_S seconds (default 550), writing what it has:
#   OUT_DIR/gpu_tests.log        pytest of tests/gpu/test_elastic_cuda.py (last 8 MB)
#   OUT_DIR/elastic_parity.json  what those tests measured
#   OUT_DIR/build.log            the checkpoint build (weights drawn on GPU 0, meanwhile the tests run)
#   OUT_DIR/elastic_2xh200.json  the benchmark (rewritten after every phase; "complete": true at the end)
#   OUT_DIR/bench.log            its log (last 8 MB)
# The benchmark's KV budget is 4 GiB per replica (what a 32B bf16 model leaves on an 80 GB GPU), so
# the weights are most of each replica's memory (the setting elasticity is for); change it with
# VATTN_ELASTIC_KV_BYTES. More benchmark options go in VATTN_ELASTIC_BENCH_ARGS (word-split, appended;
# python -m vattn_ray.bench elastic --help lists them).
set -uo pipefail
out="${1:?output folder}"
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
# The machine's RAM shows up as it is used (MemTotal starts far below it), so Ray's memory monitor
# would judge usage against too small a total and could stop the workers mid-run: it is off.
export RAY_memory_monitor_refresh_ms=0
budget="${VATTN_ELASTIC_BUDGET_S:-550}"
# The checkpoint goes to memory (/dev/shm) when it has room: no writeback of 65 GB to the disk.
shm_free=$(df -B1 --output=avail /dev/shm 2>/dev/null | tail -1)
default_ckpt=/tmp/q32
[ "${shm_free:-0}" -gt 80000000000 ] 2>/dev/null && default_ckpt=/dev/shm/q32
ckpt="${VATTN_ELASTIC_CKPT:-$default_ckpt}"
kv_bytes="${VATTN_ELASTIC_KV_BYTES:-4294967296}"
tests_s="${VATTN_ELASTIC_TESTS_S:-190}"
read -r -a extra <<< "${VATTN_ELASTIC_BENCH_ARGS:-}"
left() { echo $((budget - SECONDS)); }
stamp() { echo "[$SECONDS s] $*"; }
status=0

nvidia-smi --query-gpu=index,name,memory.total,memory.used --format=csv,noheader || true
python3 -c "import torch, ray; print('torch', torch.__version__, 'ray', ray.__version__, 'gpus', torch.cuda.device_count())" \
    || { echo "torch or ray missing (set PYTHONPATH)"; exit 2; }

# The build writes ~65 GB through the page cache with GPU 0 drawing the values: it runs beside the
# tests, which leave each GPU half free (gpu_memory_utilization=0.5).
stamp "build of $ckpt starts in the background"
# It must end by 300 s, leaving the benchmark about four minutes.
(timeout -k 5 300 python3 -m vattn_ray.bench elastic --build 32b --ckpt-dir "$ckpt" --build-only > "$out/build.log" 2>&1;
 echo "exit $?" >> "$out/build.log") &
build_pid=$!

stamp "GPU tests (at most $tests_s s)"
VATTN_RESULTS_DIR="$out" timeout -k 10 "$tests_s" python3 -m pytest -q -s -p no:cacheprovider \
    tests/gpu/test_elastic_cuda.py 2>&1 | tail -c 8000000 > "$out/gpu_tests.log" || status=1
tail -4 "$out/gpu_tests.log"
python3 -m ray.scripts.scripts stop --force > /dev/null 2>&1 || true  # actors of a test cut by timeout

wait "$build_pid"
stamp "build: $(tail -1 "$out/build.log"); $(du -sh "$ckpt" 2>/dev/null | cut -f1)"
grep -q "exit 0" "$out/build.log" || { echo "the build failed:"; tail -20 "$out/build.log"; exit 1; }
# Nothing of ours may still hold a GPU before the replicas size their memory.
for pid in $(nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>/dev/null); do
    echo "killing leftover GPU process $pid"; kill -9 "$pid" 2>/dev/null || true
done

bench_s=$(( $(left) - 5 ))
stamp "benchmark (deadline $((bench_s - 15)) s, hard stop $bench_s s)"
timeout -k 5 "$bench_s" python3 -m vattn_ray.bench elastic --model "$ckpt" --kv-cache-memory-bytes "$kv_bytes" \
    --deadline-s $((bench_s - 15)) --out "$out/elastic_2xh200.json" "${extra[@]}" 2>&1 | tail -c 8000000 > "$out/bench.log" \
    || status=1
stamp "benchmark ended"
python3 - "$out/elastic_2xh200.json" <<'EOF' || status=1
import json, sys
r = json.load(open(sys.argv[1]))
keys = ("sent", "completed", "ttft_p50_burst_ms", "ttft_p99_burst_ms", "burst_without_first_token",
        "output_tokens_per_s", "merges", "splits", "restore_s", "preemptions")
print(json.dumps({"complete": r.get("complete"), "timings_s": r.get("timings_s"), "replica_kv_tokens":
                  (r.get("replica") or {}).get("kv_tokens"), "ratios": r.get("ratios"), "restore": r.get("restore"),
                  "done_when": r.get("done_when")} | {side: {k: r[side].get(k) for k in keys}
                  for side in ("without_elasticity", "with_elasticity") if side in r}, indent=1, default=str))
EOF
[ "$status" = 0 ] || tail -30 "$out/bench.log"
exit $status

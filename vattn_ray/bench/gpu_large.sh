#!/usr/bin/env bash
# The 70B shape at TP=4 (or 8) on one host, in phases (each fits one 10-minute device call).
# Usage: TP=4 bash vattn_ray/bench/gpu_large.sh OUT_DIR PHASE...   with PHASE one of
#   setup    Ray from the wheelhouse in .whl (if present) into /tmp/site; the random 70B-shaped bf16
#            checkpoint (80 layers, hidden 8192, 64 q / 8 kv heads, 141 GB) drawn on GPU 0 into
#            /dev/shm/l70b, while the 2-GPU tests of elastic memory and the prefix-cache tests run
#   tp       python -m vattn_ray.bench tp at $TP: control overhead per step, all-reduce cost
#   serving  serve run deploy/config.tp4.gpu.yaml (its TP set to $TP) under the Poisson load
#   peer     vattn-ray and vLLM side by side at $TP, 512 x (1024 in / 256 out), decode step at 256
#            (needs /tmp/peer-site/peer_env.sh)
# Results: OUT_DIR/*.json as the benchmarks wrote them, plus one log per phase.
set -uo pipefail
out="${1:?output folder}"; shift
tp="${TP:-4}"
ckpt="${VATTN_LARGE_CKPT:-/dev/shm/l70b}"
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
# The machine's RAM shows up as it is used, so Ray's memory monitor would misjudge it (see gpu_elastic.sh).
export RAY_memory_monitor_refresh_ms=0
[ -d /tmp/site ] && export PYTHONPATH="/tmp/site:$PWD"
tag="${tp}xh200"
status=0
for phase in "$@"; do
    echo "[$SECONDS s] phase $phase"
    case "$phase" in
    setup)
        if [ -d .whl ] && [ ! -d /tmp/site/ray ]; then
            python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
        fi
        export PYTHONPATH="/tmp/site:$PWD"
        nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
        df -h /dev/shm | tail -1
        if [ ! -f "$ckpt/config.json" ]; then
            (python3 -c "from vattn_ray.model.builder import build_random_checkpoint as b; \
b('$ckpt', 'llama', preset='llama-3-70b', dtype='bfloat16', generate_on='cuda')" > "$out/build.log" 2>&1;
             echo "exit $?" >> "$out/build.log") &
            build=$!
        fi
        # Beside the build (GPU 0 only draws tensors of at most 2 GB): the GPU tests that need a
        # second GPU, and the prefix-cache tests (unmapping while steps run).
        VATTN_RESULTS_DIR="$out" timeout -k 10 330 python3 -m pytest -q -p no:cacheprovider \
            tests/gpu/test_elastic_cuda.py tests/gpu/test_prefix_cuda.py 2>&1 | tail -c 400000 > "$out/gpu_tests.log" \
            || status=1
        tail -5 "$out/gpu_tests.log"
        python3 -m ray.scripts.scripts stop --force > /dev/null 2>&1 || true
        if [ -n "${build:-}" ]; then
            wait "$build"
            echo "build: $(tail -1 "$out/build.log"), $(du -sh "$ckpt" | cut -f1) in $SECONDS s"
        fi ;;
    tp)
        timeout -k 10 420 python3 -m vattn_ray.bench tp --model "$ckpt" --tp "$tp" --no-actor-calls \
            --num-requests 256 --input-len 1024 --output-len 128 --max-num-batched-tokens 8192 \
            --out "$out/tp_70b_${tag}.json" > "$out/tp.log" 2>&1 || status=1
        grep -v Warning "$out/tp.log" | tail -25 ;;
    serving)
        cfg=/tmp/config.tp${tp}.yaml
        sed "s/tensor_parallel_size: 4/tensor_parallel_size: $tp/" deploy/config.tp4.gpu.yaml > "$cfg"
        python3 -m vattn_ray.bench serving_compare --system vattn --config "$cfg" --checkpoint "$ckpt" \
            --rates "${RATES:-4,8,12,16,20}" --duration "${DURATION:-15}" --start-timeout 300 --budget-s 500 \
            --out-dir "$out/serving" > "$out/serving.log" 2>&1 || status=1
        tail -20 "$out/serving.log"
        cp "$out/serving/serving_vattn.json" "$out/serving_70b_${tag}.json" 2>/dev/null ;;
    peer)
        timeout -k 10 560 python3 -m vattn_ray.bench throughput --model "$ckpt" --systems vllm,vattn --tp "$tp" \
            --workloads fixed --num-requests 512 --input-len 1024 --output-len 256 --decode-latency 256 \
            --decode-context 1024 --peer-env /tmp/peer-site/peer_env.sh --peer-timeout 360 \
            --out "$out/throughput_vllm_70b_${tag}.json" > "$out/peer.log" 2>&1 || status=1
        grep -v Warning "$out/peer.log" | tail -25 ;;
    *) echo "unknown phase $phase" >&2; status=2 ;;
    esac
done
exit $status

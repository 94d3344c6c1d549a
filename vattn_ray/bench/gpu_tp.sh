#!/usr/bin/env bash
# Tensor-parallel measurements on a 2-GPU machine, in phases (each fits one 10-minute device call).
# Usage: bash vattn_ray/bench/gpu_tp.sh OUT_DIR PHASE...   with PHASE one of
#   setup    Ray from the wheelhouse in .whl (if present) into /tmp/site; the 8B-shaped checkpoint
#   tests    the GPU tests of the all-reduce, the engine and TP=2
#   offline  all-reduce sweep; vattn-ray alone at TP=1 and TP=2 (256 x 1024/256, decode step at 256)
#   peer     vattn-ray and vLLM side by side at TP=2 (needs /tmp/peer-site/peer_env.sh)
# Results: OUT_DIR/*.json, as the benchmarks wrote them.
set -uo pipefail
out="${1:?output folder}"; shift
ckpt=/tmp/l8b
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
[ -d /tmp/site ] && export PYTHONPATH="/tmp/site:$PWD"
fixed=(--workloads fixed --num-requests 256 --input-len 1024 --output-len 256 --decode-latency 256
       --decode-context 1024)
status=0
for phase in "$@"; do
    case "$phase" in
    setup)
        if [ -d .whl ] && [ ! -d /tmp/site/ray ]; then
            python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
        fi
        export PYTHONPATH="/tmp/site:$PWD"
        [ -f "$ckpt/config.json" ] || python3 -c "from vattn_ray.model.builder import build_random_checkpoint as b; \
b('$ckpt', 'llama', preset='llama-3-8b', dtype='bfloat16')" ;;
    tests)
        VATTN_RESULTS_DIR="$out" python3 -m pytest -q -x tests/gpu/test_comm_cuda.py tests/gpu/test_engine_cuda.py \
            tests/gpu/test_tp_cuda.py 2>&1 | tail -5 || status=1 ;;
    offline)
        python3 -m vattn_ray.bench allreduce --tp 2 --out "$out/allreduce_2xh200.json" | tail -12 || status=1
        for tp in 1 2; do
            python3 -m vattn_ray.bench throughput --model "$ckpt" --systems vattn --tp $tp "${fixed[@]}" \
                --out "$out/throughput_tp${tp}_2xh200.json" 2>&1 | grep -v Warning | tail -8 || status=1
        done ;;
    peer)
        python3 -m vattn_ray.bench throughput --model "$ckpt" --systems vllm,vattn --tp 2 "${fixed[@]}" \
            --peer-env /tmp/peer-site/peer_env.sh --peer-timeout 400 \
            --out "$out/throughput_vllm_tp2_2xh200.json" 2>&1 | grep -v Warning | tail -12 || status=1 ;;
    *) echo "unknown phase $phase" >&2; status=2 ;;
    esac
done
exit $status

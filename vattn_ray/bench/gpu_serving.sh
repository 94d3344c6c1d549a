#!/usr/bin/env bash
# Serving benchmark on a GPU machine: `serve run` of deploy/config.gpu.yaml with a
# Llama-3-8B-shaped random checkpoint, then Poisson streaming load at several rates.
# Usage: bash vattn_ray/bench/gpu_serving.sh OUT_DIR [CHECKPOINT_DIR] [RATES]
# (SERVE="python3 -m ray.serve.scripts" where the `serve` command is not on PATH.)
set -uo pipefail
out="${1:?output folder}"
ckpt="${2:-/tmp/vattn-llama3-8b}"
rates="${3:-2,4,8,16}"
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
[ -f "$ckpt/config.json" ] || python3 -c "from vattn_ray.model.builder import build_random_checkpoint as b; \
b('$ckpt', 'llama', preset='llama-3-8b', dtype='bfloat16')"
# The GPU config as shipped, pointed at the checkpoint built here.
sed -e "s#model: /models/Meta-Llama-3-8B-Instruct#model: $ckpt#" \
    -e "s#placement_wait_s: 600#placement_wait_s: 30#" deploy/config.gpu.yaml > "$out/config.gpu.yaml"
start=$(date +%s)
setsid ${SERVE:-serve} run "$out/config.gpu.yaml" > "$out/serve.log" 2>&1 &
server=$!
for _ in $(seq 1 180); do
    curl -sf localhost:8000/health > /dev/null && break
    sleep 1
done
echo "serve run ready after $(( $(date +%s) - start )) s"
curl -s localhost:8000/v1/completions -H 'content-type: application/json' \
    -d '{"model": "llama-3-8b-instruct", "prompt": [1, 2, 3, 4], "max_tokens": 8, "ignore_eos": true}'
echo
python3 -m vattn_ray.bench serving --url http://127.0.0.1:8000 --model llama-3-8b-instruct \
    --model-path "$ckpt" --rates "$rates" --duration 30 --input-len 512 --output-len 128 \
    --timeout 120 --out "$out/serving.json"
status=$?
kill -TERM -- -"$server" 2>/dev/null || kill -TERM "$server"
wait "$server" 2>/dev/null
exit $status

#!/usr/bin/env bash
# Serving on a 2-GPU machine: `serve run deploy/config.gpu.yaml` (TP=2) and, with --system vllm or
# both, vLLM's OpenAI server (TP=2) under the same Poisson load, one after the other.
# Usage: bash vattn_ray/bench/gpu_serving.sh OUT_DIR [serving_compare options...]
#   e.g. bash vattn_ray/bench/gpu_serving.sh out --system vattn --rates 4,16,32,48,64 --duration 20
# The vLLM peer's env script is used when it exists (/tmp/peer-site/peer_env.sh, or $PEER_ENV).
# Every option and the JSON it writes: python -m vattn_ray.bench serving_compare --help
set -uo pipefail
out="${1:?output folder}"
shift
peer_env="${PEER_ENV:-/tmp/peer-site/peer_env.sh}"
peer=()
[ -f "$peer_env" ] && peer=(--peer-env "$peer_env")
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
exec python3 -m vattn_ray.bench serving_compare --out-dir "$out" "${peer[@]}" "$@"

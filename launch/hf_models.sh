#!/usr/bin/env bash
# Capacity-aware perplexity, greedy generation and expert load of a Hugging Face MoE checkpoint
# (examples/hf_models/evaluate.py) through Megatron-LM's arguments and capaware_megatron's wrapper.
# One invocation per node, e.g. 8 GPUs, EP8, bf16:
#   HF_PATH=/models/Qwen3-30B-A3B EP=8 launch/hf_models.sh --text heldout.txt --bf16 --seq-length 2048
# On a machine without a GPU it runs GPUS_PER_NODE (default 2) gloo processes on the CPU with the
# flags a CPU needs. Extra arguments go to evaluate.py (Megatron's flags and its own).
set -euo pipefail
: "${HF_PATH:?a Hugging Face checkpoint folder (config.json, tokenizer, safetensors)}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON=${PYTHON:-python}
if ! "$PYTHON" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then
    export GPUS_PER_NODE=${GPUS_PER_NODE:-2} TORCHDYNAMO_DISABLE=1
    DEVICE_ARGS=(--distributed-backend gloo --use-cpu-initialization --transformer-impl local
                 --no-persist-layer-norm --no-gradient-accumulation-fusion)
else
    DEVICE_ARGS=(--transformer-impl local)
fi
source "$ROOT/launch/torchrun_cluster.sh"
export CUDA_DEVICE_MAX_CONNECTIONS=1  # Megatron asserts it under tensor parallelism
exec "$PYTHON" -m torch.distributed.run "${TORCHRUN_ARGS[@]}" -m capaware_megatron.megatron.run \
    "$ROOT/examples/hf_models/evaluate.py" --hf-path "$HF_PATH" \
    --expert-model-parallel-size "${EP:-$GPUS_PER_NODE}" --moe-token-dispatcher capaware \
    "${DEVICE_ARGS[@]}" "${CAPAWARE_ARGS[@]}" "$@"

#!/usr/bin/env bash
# Megatron-LM's inference server (OpenAI-compatible; dynamic engine; CUDA-graph decode) with the
# capaware dispatcher: Megatron-LM's own examples/inference/launch_inference_server.py, unmodified,
# started as a module through capaware_megatron's wrapper, as Megatron starts it. One invocation
# per node (torchrun), e.g.:
#   MEGATRON_LM=/path/to/Megatron-LM CHECKPOINT=/path/to/moe-ckpt launch/megatron_text_generation_server.sh
# Needs: MEGATRON_LM (a Megatron-LM checkout), CHECKPOINT (a trained MoE saved with its arguments),
# TOKENIZER (a Hugging Face tokenizer name or path). Extra arguments go to the server.
#
# Decode runs in Megatron's standard MoE path (transformer_impl transformer_engine): for each
# CUDA-graph step Megatron's controller switches every MoE layer to drop-and-pad with capacity
# factor E/k (every expert computes T rows per source rank); a capaware layer pads to
# C = ceil(gamma*T*k/E) instead. transformer_impl inference_optimized replaces the dispatcher at
# every forward, so capaware refuses it.
set -euo pipefail
: "${MEGATRON_LM:?path of a Megatron-LM checkout}"
: "${CHECKPOINT:?trained MoE checkpoint to serve}"
: "${TOKENIZER:=mistralai/Mixtral-8x7B-v0.1}"
source "$(cd "$(dirname "$0")" && pwd)/torchrun_cluster.sh"
export CUDA_DEVICE_MAX_CONNECTIONS=1

SERVER_ARGS=(
    --load "$CHECKPOINT" --use-checkpoint-args --dist-ckpt-strictness log_unexpected
    --micro-batch-size 1 --bf16 --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOKENIZER"
    --inference-max-seq-length 4096 --inference-dynamic-batching-buffer-size-gb 20
    --inference-dynamic-batching-max-requests 256 --inference-dynamic-batching-max-tokens 2048
    --port "${PORT:-5000}"
)
PARALLEL_ARGS=(
    --tensor-model-parallel-size 1 --expert-model-parallel-size "${EP:-8}"
    --pipeline-model-parallel-size 1
)
DECODE_ARGS=(  # CUDA-graph decode, capacity-aware padding
    --transformer-impl transformer_engine --moe-router-dtype fp32 --cuda-graph-impl local
    --inference-dynamic-batching-num-cuda-graphs -1 --moe-pad-experts-for-cuda-graph-inference
)

# `-m MODULE` runs from the current folder, like python -m: the Megatron-LM checkout.
cd "$MEGATRON_LM"
torchrun "${TORCHRUN_ARGS[@]}" -m capaware_megatron.megatron.run -m examples.inference.launch_inference_server \
    "${SERVER_ARGS[@]}" "${PARALLEL_ARGS[@]}" "${DECODE_ARGS[@]}" "${CAPAWARE_ARGS[@]}" "$@"

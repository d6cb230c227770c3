#!/usr/bin/env bash
# Megatron-LM on a GPU cluster with the capaware dispatcher: an unmodified pretrain_gpt.py run
# through capaware_megatron's wrapper. One invocation per node (torchrun), e.g. with SLURM:
#   srun --nodes 2 --ntasks-per-node 1 launch/megatron_gpt_moe.sh
# Needs: MEGATRON_LM (a Megatron-LM checkout), DATA_PATH, CHECKPOINT (a trained MoE), TOKENIZER.
set -euo pipefail
: "${MEGATRON_LM:?path of a Megatron-LM checkout}"
: "${DATA_PATH:?Megatron data prefix}"
: "${CHECKPOINT:?trained MoE checkpoint to evaluate}"
: "${TOKENIZER:=meta-llama/Llama-2-7b-hf}"
source "$(cd "$(dirname "$0")" && pwd)/torchrun_cluster.sh"

MODEL_ARGS=(  # Mixtral-8x7B-like; replace with your model's
    --num-layers 32 --hidden-size 4096 --ffn-hidden-size 14336 --num-attention-heads 32
    --group-query-attention --num-query-groups 8 --seq-length 4096 --max-position-embeddings 32768
    --position-embedding-type rope --normalization RMSNorm --swiglu --untie-embeddings-and-output-weights
    --disable-bias-linear --num-experts 8 --moe-router-topk 2 --moe-grouped-gemm
    --moe-router-load-balancing-type aux_loss --moe-aux-loss-coeff 1e-2
)
PARALLEL_ARGS=(
    --tensor-model-parallel-size 1 --expert-model-parallel-size 8 --pipeline-model-parallel-size "${PP:-1}"
    --sequence-parallel --use-distributed-optimizer
)
EVAL_ARGS=(
    --micro-batch-size 1 --global-batch-size 64 --train-iters 1 --eval-iters 50 --eval-interval 1
    --skip-train --load "$CHECKPOINT" --data-path "$DATA_PATH" --split 0,0,100
    --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOKENIZER" --bf16
)

torchrun "${TORCHRUN_ARGS[@]}" -m capaware_megatron.megatron.run "$MEGATRON_LM/pretrain_gpt.py" \
    "${MODEL_ARGS[@]}" "${PARALLEL_ARGS[@]}" "${EVAL_ARGS[@]}" "${CAPAWARE_ARGS[@]}" "$@"

# Sourced by the Megatron launchers: where this node sits in a (SLURM) torchrun job, as
# TORCHRUN_ARGS, and the capaware arguments (CAPAWARE_ARGS, examples/megatron_capaware_args.sh).
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NNODES=${SLURM_NNODES:-1}
NODE_RANK=${SLURM_NODEID:-0}
MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" 2>/dev/null | head -n 1 || echo localhost)}
TORCHRUN_ARGS=(
    --nproc-per-node "$GPUS_PER_NODE" --nnodes "$NNODES" --node-rank "$NODE_RANK"
    --master-addr "$MASTER_ADDR" --master-port "${MASTER_PORT:-6000}"
)
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/../examples/megatron_capaware_args.sh"

#!/usr/bin/env bash
# DeepSpeed-MoE with the capacity-aware gate: the `deepspeed` launcher, the config JSON with its
# "capacity_aware" section. TRAIN_SCRIPT is your script; it builds its model with
# deepspeed.moe.layer.MoE and calls, after deepspeed.initialize:
#     capaware_megatron.deepspeed.apply(engine, args.deepspeed_config)
# Usage: launch/deepspeed_moe.sh [--hostfile hosts] -- extra script args
set -euo pipefail
: "${TRAIN_SCRIPT:?your DeepSpeed training / evaluation script}"
CONFIG=${CONFIG:-$(dirname "$0")/../examples/deepspeed_capacity_aware.json}
deepspeed --num_gpus "${GPUS_PER_NODE:-8}" "$TRAIN_SCRIPT" --deepspeed --deepspeed_config "$CONFIG" "$@"

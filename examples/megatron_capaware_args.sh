# Megatron-LM arguments for capacity-aware inference / evaluation of an MoE model.
# Source this file, then append "${CAPAWARE_ARGS[@]}" to a pretrain_gpt.py command line run
# through `python -m capaware_megatron.megatron.run` (see launch/megatron_gpt_moe.sh).
CAPAWARE_ARGS=(
    --moe-token-dispatcher capaware     # alias of --moe-token-dispatcher-type capaware
    --capaware-capacity-factor 1.5      # gamma; omit for dropless
    --capaware-policy drop              # none | drop | reroute | expanded
    --capaware-priority score           # score | position | reverse | random
    --capaware-scope local              # local | device | global
    --capaware-min-capacity 4           # decode-sized steps are never capped
    --capaware-backend auto             # Triton on GPU, torch on CPU
    --capaware-log-interval 10          # load statistics to Megatron's TensorBoard / W&B writers
    # --capaware-log-per-expert         # also per-expert histograms and a layer x expert heatmap
    # --capaware-renormalize            # rescale kept weights to the original top-k sum
    # --capaware-apply-in-training      # also cap while training
)
# Do not also pass --moe-expert-capacity-factor: Megatron's router would drop tokens first
# (the wrapper refuses the combination).

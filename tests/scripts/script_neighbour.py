"""A module beside the fake script, as Megatron-LM's gpt_builders.py is beside pretrain_gpt.py."""

NEIGHBOUR = "found"

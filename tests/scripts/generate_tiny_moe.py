"""A Megatron-LM inference script of this project's own, shaped like Megatron-LM's
examples/inference scripts (launch_inference_server.py, gpt_static_inference.py): its own
extra_args_provider, parse_and_validate_args, initialize_megatron, the model built with
megatron.training.get_model and loaded from a checkpoint (what megatron/inference/utils.py's
get_model_for_inference does), then greedy generation under InferenceMode with a KV cache: an
eager prefill step, then one decode step per token, which Megatron's text-generation controller
runs padded for CUDA graphs (set_decode_expert_padding) when
--moe-pad-experts-for-cuda-graph-inference is set. On CPU, through the wrapper:
    torchrun --nproc-per-node 2 -m capaware_megatron.megatron.run tests/scripts/generate_tiny_moe.py \
        --load CHECKPOINT --moe-token-dispatcher capaware --capaware-capacity-factor 1.0 ...
"""

import json

import torch

from capaware_megatron.megatron import cpu_shims

cpu_shims.apply_training_loop()

from megatron.core.inference.contexts import StaticInferenceContext  # noqa: E402
from megatron.core.inference.utils import InferenceMode, set_decode_expert_padding  # noqa: E402
from megatron.training import get_args, get_model, initialize_megatron  # noqa: E402
from megatron.training.arguments import parse_and_validate_args  # noqa: E402
from megatron.training.checkpointing import load_checkpoint  # noqa: E402
from tiny_moe_model import model_provider  # noqa: E402


def add_generate_args(parser):
    group = parser.add_argument_group(title="tiny MoE generation")
    group.add_argument("--prompts-per-rank", type=int, default=8)
    group.add_argument("--prompt-length", type=int, default=6)
    group.add_argument("--num-tokens-to-generate", type=int, default=4)
    group.add_argument("--output-path", required=True, help="Generated tokens, one JSON per rank.")
    return parser


def get_model_for_inference():
    """Build, load and switch to eval, as megatron/inference/utils.py does."""
    model = get_model(model_provider, wrap_with_ddp=False)
    load_checkpoint(model, None, None, strict=True)
    model = model[0]
    model.eval()
    return model


def generate(model, prompts: torch.Tensor, num_tokens: int, pad_decode: bool) -> torch.Tensor:
    """[B, num_tokens] greedy continuation of [B, P] prompts."""
    config = model.config
    batch, length = prompts.shape
    context = StaticInferenceContext(batch, length + num_tokens)
    tokens = prompts
    with torch.no_grad(), InferenceMode.active():
        for step in range(num_tokens):
            decode = step > 0
            if pad_decode:  # before every step, as the controller does (decode: a CUDA-graph step)
                if decode:
                    set_decode_expert_padding(
                        model, True, capacity_factor=config.num_moe_experts / config.moe_router_topk)
                else:
                    set_decode_expert_padding(model, False)
            inputs = tokens[:, -1:] if decode else tokens
            start = tokens.shape[1] - inputs.shape[1]
            positions = torch.arange(start, tokens.shape[1]).expand(batch, -1)
            mask = None if decode else torch.ones(
                1, 1, length, length, dtype=torch.bool).tril().logical_not()
            logits = model(inputs, positions, mask, inference_context=context,
                           runtime_gather_output=True)
            context.sequence_len_offset += inputs.shape[1]
            tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokens[:, length:]


def main():
    args = parse_and_validate_args(extra_args_provider=add_generate_args,
                                   args_defaults={"no_load_rng": True, "no_load_optim": True})
    initialize_megatron()
    args = get_args()
    model = get_model_for_inference()
    data_rank = torch.distributed.get_rank()  # no tensor parallelism here: one batch per rank
    generator = torch.Generator().manual_seed(10 + data_rank)
    prompts = torch.randint(0, args.padded_vocab_size, (args.prompts_per_rank, args.prompt_length),
                            generator=generator)
    generated = generate(model, prompts, args.num_tokens_to_generate,
                         args.moe_pad_experts_for_cuda_graph_inference)
    with open(f"{args.output_path}.rank{data_rank}.json", "w") as out:
        json.dump(generated.tolist(), out)


if __name__ == "__main__":
    main()

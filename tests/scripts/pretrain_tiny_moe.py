"""A Megatron-LM pretraining script of this project's own, shaped like Megatron-LM's
pretrain_gpt.py (model provider, dataset provider, forward step, `pretrain`), on CPU.

Run it as a user would run pretrain_gpt.py, through the wrapper:
    torchrun --nproc-per-node 2 -m capaware_megatron.megatron.run tests/scripts/pretrain_tiny_moe.py \
        --moe-token-dispatcher capaware ...
The data are mock: a fixed random token stream (the model learns nothing useful; the loop,
the plans and the statistics are what is tested).
"""

from functools import partial

import torch

from capaware_megatron.megatron import cpu_shims

cpu_shims.apply_training_loop()

from megatron.core.enums import ModelType  # noqa: E402
from megatron.training import get_args, pretrain  # noqa: E402
from megatron.training.argument_utils import (  # noqa: E402
    gpt_config_from_args,
    pretrain_cfg_container_from_args,
)
from megatron.training.arguments import parse_and_validate_args  # noqa: E402
from tiny_moe_model import model_provider  # noqa: E402  (a neighbour, like gpt_builders)


class MockTokens(torch.utils.data.Dataset):
    """`size` samples of seq_length + 1 tokens, the same on every rank for a given seed."""

    def __init__(self, size: int, seq_length: int, vocab_size: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.tokens = torch.randint(0, vocab_size, (size, seq_length + 1), generator=generator)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> dict:
        return {"tokens": self.tokens[index]}


def train_valid_test_datasets_provider(num_samples):
    args = get_args()
    return tuple(
        MockTokens(max(count, 1), args.seq_length, args.padded_vocab_size, seed)
        for count, seed in zip(num_samples, (1, 2, 3))
    )


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    loss = torch.sum(output_tensor.float().view(-1) * loss_mask.view(-1))
    num_tokens = loss_mask.sum().to(torch.int)
    return loss, num_tokens, {"lm loss": torch.stack([loss.detach(), num_tokens.float()])}


def forward_step(data_iterator, model):
    tokens = next(data_iterator)["tokens"]
    inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    position_ids = torch.arange(inputs.shape[1]).expand_as(inputs)
    output = model(inputs, position_ids, attention_mask=None, labels=labels)
    return output, partial(loss_func, torch.ones_like(labels, dtype=torch.float))


def add_script_args(parser):
    """The script's own arguments, as Megatron-LM's scripts add theirs."""
    parser.add_argument("--tiny-model-from", choices=("provider", "config"), default="provider",
                        help="Build through a model provider (get_model) or a ModelConfig "
                             "(Megatron-LM's pretrain_gpt.py).")
    return parser


train_valid_test_datasets_provider.is_distributed = True

if __name__ == "__main__":
    args = parse_and_validate_args(extra_args_provider=add_script_args,
                                   args_defaults={"tokenizer_type": "NullTokenizer"})
    from_config = args.tiny_model_from == "config"
    pretrain(
        pretrain_cfg_container_from_args(args, gpt_config_from_args(args) if from_config else None),
        train_valid_test_datasets_provider,
        ModelType.encoder_or_decoder,
        forward_step,
        model_provider=None if from_config else model_provider,
    )

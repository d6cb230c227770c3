"""Stands in for an unmodified Megatron-LM script: parses with its own extra_args_provider."""

import json
import sys

from megatron.training.arguments import parse_args
from script_neighbour import NEIGHBOUR  # found only with the script's folder on sys.path


def add_script_args(parser):
    parser.add_argument("--script-own-flag", type=int, default=0)
    return parser


if __name__ == "__main__":
    args = parse_args(extra_args_provider=add_script_args, ignore_unknown_args=True)
    from capaware_megatron.megatron import config

    json.dump(
        {
            "dispatcher": args.moe_token_dispatcher_type,
            "script_own_flag": args.script_own_flag,
            "neighbour": NEIGHBOUR,
            "name": __name__,
            "capacity": None if config._default is None else config._default.__dict__,
        },
        sys.stdout,
    )

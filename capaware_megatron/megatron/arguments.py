"""Megatron-LM command-line arguments: --capaware-* and the capaware dispatcher choice."""

from __future__ import annotations

import argparse
from typing import Any, Callable, Optional

from ..config import (
    BACKENDS,
    DEFAULT_REROUTE_ROUNDS,
    POLICIES,
    PRIORITIES,
    REROUTE_WEIGHTS,
    SCOPES,
    CapacityConfig,
)
from .config import DISPATCHER_TYPE, check_megatron_conflicts

ArgsProvider = Callable[[argparse.ArgumentParser], argparse.ArgumentParser]
DISPATCHER_FLAG = "--moe-token-dispatcher-type"
DISPATCHER_ALIAS = "--moe-token-dispatcher"


def _none_or_float(text: str) -> Optional[float]:
    return None if text.lower() in ("none", "null", "") else float(text)


def _floor(text: str):
    """--capaware-min-capacity: an int, 'auto', or a calibration file's path."""
    try:
        return int(text)
    except ValueError:
        return text


def _token_bound(text: str):
    if text.lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 1 or 'auto', got {text!r}") from None


def add_capaware_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the --capaware-* group and the 'capaware' dispatcher choice (and its alias flag)."""
    group = parser.add_argument_group(title="capacity-aware inference (capaware_megatron)")
    group.add_argument("--capaware-capacity-factor", type=_none_or_float, default=None,
                       help="gamma: cap every expert at ceil(T*k/E*gamma) assignments; "
                            "None (default) is dropless.")
    group.add_argument("--capaware-policy", choices=POLICIES, default=None,
                       help="What happens to the overflow (default: drop with a capacity factor, "
                            "none without one).")
    group.add_argument("--capaware-priority", choices=PRIORITIES, default="score",
                       help="Which assignments a full expert keeps (default score).")
    group.add_argument("--capaware-scope", choices=SCOPES, default="local",
                       help="local: per-rank cap; device: per-EP-rank cap; global: group-wide.")
    group.add_argument("--capaware-min-capacity", type=_floor, default=0,
                       help="Floor and decode guard: C is never below it and nothing is capped "
                            "while T*k/E is below it (default 0). 'auto' or a calibration "
                            "file's path: the knee of the layer's expert GEMM time on this "
                            "device (python -m capaware_megatron.calibrate).")
    group.add_argument("--capaware-decode-capacity-factor", type=_none_or_float, default=None,
                       help="gamma of CUDA-graph decode steps (default: --capaware-capacity-factor); "
                            "alone, only decode is capped.")
    group.add_argument("--capaware-renormalize", action="store_true",
                       help="Rescale each token's kept weights to its original top-k sum.")
    group.add_argument("--capaware-apply-in-training", action="store_true",
                       help="Also cap in training (default: eval/inference only).")
    group.add_argument("--capaware-seed", type=int, default=0, help="Seed of priority random.")
    group.add_argument("--capaware-reroute-rounds", type=int, default=DEFAULT_REROUTE_ROUNDS,
                       help=f"Proposal rounds of policy reroute (default {DEFAULT_REROUTE_ROUNDS}).")
    group.add_argument("--capaware-reroute-weight", choices=REROUTE_WEIGHTS, default="score",
                       help="Policy reroute: a rerouted assignment weighs its new expert's score "
                            "(score, the paper's) or the replaced assignment's weight (carry).")
    group.add_argument("--capaware-max-tokens-per-rank", type=_token_bound, default=None,
                       help="Scope global: the most tokens one rank plans in a step (an int; "
                            "'auto': --micro-batch-size x --seq-length, over TP with sequence "
                            "parallelism and over context parallelism, what training and "
                            "evaluation see; inference: the engine's max tokens per step). The "
                            "group-wide thresholds then take one gather instead of eight.")
    group.add_argument("--capaware-backend", choices=BACKENDS, default="auto",
                       help="Planner backend (auto: Triton on GPU, torch on CPU).")
    group.add_argument("--capaware-log-interval", type=int, default=0,
                       help="Log load statistics every N steps (0: off).")
    group.add_argument("--capaware-log-per-expert", action="store_true",
                       help="Also log per-expert loads and a layer x expert heatmap.")
    _allow_capaware_dispatcher(parser)
    return parser


def _allow_capaware_dispatcher(parser: argparse.ArgumentParser) -> None:
    """Extend --moe-token-dispatcher-type's choices; add --moe-token-dispatcher as an alias."""
    action = next((a for a in parser._actions if DISPATCHER_FLAG in a.option_strings), None)
    if action is None:  # a parser without Megatron's arguments: add the flag ourselves
        action = parser.add_argument(DISPATCHER_FLAG, default="allgather",
                                     dest="moe_token_dispatcher_type")
    if action.choices is not None and DISPATCHER_TYPE not in action.choices:
        action.choices = [*action.choices, DISPATCHER_TYPE]
    if DISPATCHER_ALIAS not in parser._option_string_actions:
        # Megatron's parser sets allow_abbrev=False, so the short form needs its own entry.
        action.option_strings.append(DISPATCHER_ALIAS)
        parser._option_string_actions[DISPATCHER_ALIAS] = action


def compose_args_providers(first: Optional[ArgsProvider], then: ArgsProvider) -> ArgsProvider:
    """An extra_args_provider running the script's own provider, then ours."""

    def provider(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        if first is not None:
            parser = first(parser)
        return then(parser)

    return provider


def capacity_config_from_args(args: Any) -> CapacityConfig:
    """CapacityConfig from parsed Megatron-LM arguments (validated)."""
    return CapacityConfig(
        capacity_factor=args.capaware_capacity_factor,
        policy=args.capaware_policy,
        priority=args.capaware_priority,
        scope=args.capaware_scope,
        min_capacity=args.capaware_min_capacity,
        renormalize=args.capaware_renormalize,
        apply_in_training=args.capaware_apply_in_training,
        seed=args.capaware_seed,
        backend=args.capaware_backend,
        reroute_rounds=args.capaware_reroute_rounds,
        reroute_weight=args.capaware_reroute_weight,
        decode_capacity_factor=getattr(args, "capaware_decode_capacity_factor", None),
        max_tokens_per_rank=_max_tokens_per_rank(args),
    )


def _max_tokens_per_rank(args: Any) -> Optional[int]:
    """--capaware-max-tokens-per-rank, with 'auto' from the micro-batch the training loop runs."""
    bound = getattr(args, "capaware_max_tokens_per_rank", None)
    if bound != "auto":
        return bound
    micro_batch, seq_length = getattr(args, "micro_batch_size", None), getattr(args, "seq_length", None)
    if not micro_batch or not seq_length:
        raise ValueError(
            "--capaware-max-tokens-per-rank auto needs --micro-batch-size and --seq-length "
            f"(got {micro_batch!r} and {seq_length!r}); give the bound as an int instead"
        )
    split = getattr(args, "context_parallel_size", 1) or 1
    if getattr(args, "sequence_parallel", False):
        split *= getattr(args, "tensor_model_parallel_size", 1) or 1
    return -(-micro_batch * seq_length // split)


def validate_capaware_args(args: Any) -> Optional[CapacityConfig]:
    """The CapacityConfig when the capaware dispatcher is selected; clear errors on conflicts."""
    if getattr(args, "moe_token_dispatcher_type", None) != DISPATCHER_TYPE:
        factor = next((flag for flag in ("capacity_factor", "decode_capacity_factor")
                       if getattr(args, f"capaware_{flag}", None) is not None), None)
        if factor is not None:
            raise ValueError(
                f"--capaware-{factor.replace('_', '-')} needs --moe-token-dispatcher-type capaware "
                f"(got {getattr(args, 'moe_token_dispatcher_type', None)!r})"
            )
        return None
    check_megatron_conflicts(args)
    return capacity_config_from_args(args)

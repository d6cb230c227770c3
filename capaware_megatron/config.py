"""CapacityConfig: every knob of the capacity-aware routing plan, validated at the boundary.

The same dataclass is built from Megatron-LM arguments, from a TransformerConfig and from the
DeepSpeed config JSON; each of those converters lives in its framework's subpackage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any, Literal, Mapping, Optional, Union, get_args

import torch

Policy = Literal["none", "drop", "reroute", "expanded"]
Priority = Literal["score", "position", "reverse", "random"]
Scope = Literal["local", "device", "global"]
Backend = Literal["auto", "torch", "triton"]
RerouteWeight = Literal["score", "carry"]

POLICIES: tuple[str, ...] = get_args(Policy)
PRIORITIES: tuple[str, ...] = get_args(Priority)
SCOPES: tuple[str, ...] = get_args(Scope)
BACKENDS: tuple[str, ...] = get_args(Backend)
REROUTE_WEIGHTS: tuple[str, ...] = get_args(RerouteWeight)
Count = Union[int, torch.Tensor]
"""A token count or capacity: a Python int, or a 0-dim int64 tensor when it stays on the device."""
DEFAULT_REROUTE_ROUNDS = 5
"""Measured by examples/benchmarks/bench_reroute.py (results/reroute-cpu.txt): the fewest rounds placing
>= 99% of what the exact serial greedy places on the trained routing and Zipf routers."""
GATHERED_TOP_KEYS_MAX = 2048
"""Global scope with C on the device and a token bound: up to this C_max each bin's threshold
comes from one [B, C_max] gather of the ranks' top keys; above it the radix select's 8 gathers
of [B, 256] digit counts move fewer bytes."""
TRITON_MAX_EXPERTS = 512
"""Most experts the Triton planner handles (one row of experts per program); auto uses torch above."""


@dataclass(frozen=True)
class CapacityConfig:
    """How the routing plan caps expert load (arXiv 2503.05066).

    Capacity C = max(ceil(T * k / E * capacity_factor), min_capacity), computed with the same
    formula as Megatron-Core's ``get_capacity`` so that ``scope="local"`` drop equals its
    ``moe_token_drop_policy="probs"`` drop.
    """

    capacity_factor: Optional[float] = None
    """gamma. None means dropless: the plan is the identity."""

    policy: Optional[Policy] = None
    """none: pass-through; drop: keep each expert's top-C assignments; reroute: overflow moves to
    the token's next-best expert with room; expanded: candidates are top-k plus the experts hosted
    on the token's own device, each expert keeps its top-C candidates. None (the default) resolves
    to drop when capacity_factor is set and to none when it is not; a capping policy named without
    a capacity_factor, or a capacity_factor with policy none, is refused (either would silently do
    nothing)."""

    priority: Priority = "score"
    """Which assignments an over-full expert keeps: score (router probability), position (earliest
    tokens), reverse (latest tokens), random (seeded hash, reproducible)."""

    scope: Scope = "local"
    """local: T is this rank's tokens, per-expert cap; device: per-EP-rank cap on the sum of its
    experts' loads (m * gamma * Nbar); global: T is the whole group's tokens and the plan equals the
    single-process plan of the gathered batch."""

    min_capacity: Union[int, str] = 0
    """Floor and decode guard: C is never below it, and when T * k / E < min_capacity nothing is
    dropped. "auto" or a calibration file's path: the knee of the layer's expert GEMM time on
    this device (capaware_megatron.calibrate), which the layer resolves to a number when it is
    built, so that a cap never cuts an expert where rows cost no time."""

    renormalize: bool = False
    """Rescale each token's kept weights to the sum its original top-k weights had."""

    apply_in_training: bool = False
    """Capacity applies in eval/inference; True applies it in training too."""

    seed: int = 0
    """Seed of priority="random"."""

    backend: Backend = "auto"
    """auto: Triton for CUDA tensors when triton is installed, else torch."""

    reroute_rounds: int = DEFAULT_REROUTE_ROUNDS
    """policy reroute: proposal rounds (each pending overflow assignment proposes its token's
    next-best expert with room; each expert accepts by priority up to its room). A fixed number
    of device rounds, so the plan never waits for the host."""

    reroute_weight: RerouteWeight = "score"
    """policy reroute: the combine weight of a rerouted assignment. score (the paper's): the new
    expert's router score; carry: the weight the router gave the assignment it replaces."""

    decode_capacity_factor: Optional[float] = None
    """gamma of decode steps (Megatron's CUDA-graph decode), whose tokens per expert are an order
    of magnitude below prefill's; None: capacity_factor. Set alone (capacity_factor None),
    prefill is dropless and only decode is capped."""

    max_tokens_per_rank: Optional[int] = None
    """The most tokens one rank plans in a step, when the caller knows it (training: micro-batch
    x sequence length; an inference engine: its maximum tokens per step). Scope global, eager
    steps: the group's capacity is then bounded on the host (C_max for W ranks of this many
    tokens) while C itself stays on the device, and each bin's group-wide threshold comes from
    one [B, C_max] gather of every rank's top keys instead of a radix select's 8 gathers (when
    C_max <= GATHERED_TOP_KEYS_MAX, where that gather carries no more bytes). A rank with more
    tokens is an error (validate=True: raised on every rank; else a device assert), and the plan
    never places more than C either way. None: no bound."""

    def __post_init__(self) -> None:
        capped_somewhere = self.capacity_factor is not None or self.decode_capacity_factor is not None
        if self.policy is None:  # frozen: resolve the default in place, once
            object.__setattr__(self, "policy", "drop" if capped_somewhere else "none")
        _check_choice("policy", self.policy, POLICIES)
        _check_choice("priority", self.priority, PRIORITIES)
        _check_choice("scope", self.scope, SCOPES)
        _check_choice("backend", self.backend, BACKENDS)
        _check_choice("reroute_weight", self.reroute_weight, REROUTE_WEIGHTS)
        for name in ("capacity_factor", "decode_capacity_factor"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a positive number or None, got {value!r}")
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be > 0 (or None for dropless), got {value!r}")
            if self.policy == "none":
                raise ValueError(
                    f"{name}={value} has no effect with policy='none': "
                    f"use policy 'drop', 'reroute' or 'expanded', or {name}=None"
                )
        if not capped_somewhere and self.policy != "none":
            raise ValueError(
                f"policy={self.policy!r} needs a capacity_factor (gamma > 0); without one the plan "
                "is dropless: set capacity_factor, or use policy 'none' (or leave policy unset)"
            )
        if self.max_tokens_per_rank is not None:
            if isinstance(self.max_tokens_per_rank, bool) or not isinstance(self.max_tokens_per_rank, int):
                raise TypeError(f"max_tokens_per_rank must be an int or None, got {self.max_tokens_per_rank!r}")
            if self.max_tokens_per_rank < 1:
                raise ValueError(f"max_tokens_per_rank must be >= 1 (or None), got {self.max_tokens_per_rank}")
        _check_floor(self.min_capacity, self.max_tokens_per_rank)
        for name in ("seed", "reroute_rounds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {value!r}")
        if self.reroute_rounds < 1:
            raise ValueError(f"reroute_rounds must be >= 1, got {self.reroute_rounds}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")
        for name in ("renormalize", "apply_in_training"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def is_dropless(self) -> bool:
        """True when the plan is the identity whatever the routing."""
        return self.policy == "none" or self.capacity_factor is None

    def for_decode(self) -> "CapacityConfig":
        """The configuration a decode step plans with: decode_capacity_factor as its gamma."""
        if self.decode_capacity_factor is None:
            return self
        return replace(self, capacity_factor=self.decode_capacity_factor, decode_capacity_factor=None)

    def caps(self, training: bool) -> bool:
        """Whether the plan caps experts for a module in this mode (training caps only with
        apply_in_training)."""
        return not self.is_dropless and (self.apply_in_training or not training)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "CapacityConfig":
        """A CapacityConfig from a mapping of its fields; unknown keys are refused by name."""
        if not isinstance(values, Mapping):
            raise TypeError(f"expected a mapping of CapacityConfig fields, got {type(values).__name__}")
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise ValueError(
                f"unknown CapacityConfig field(s) {unknown}; allowed: {', '.join(cls.field_names())}"
            )
        return cls(**values)


def _check_floor(floor: Any, max_tokens_per_rank: Optional[int]) -> None:
    """min_capacity: an int >= 0, "auto", or the path of a calibration file that exists and parses."""
    if isinstance(floor, bool) or not isinstance(floor, (int, str)):
        raise TypeError(f'min_capacity must be an int >= 0, "auto" or a calibration file path, got {floor!r}')
    if isinstance(floor, int):
        if floor < 0:
            raise ValueError(f"min_capacity must be >= 0, got {floor}")
        if max_tokens_per_rank is not None and floor > max_tokens_per_rank:
            raise ValueError(
                f"min_capacity={floor} is larger than max_tokens_per_rank={max_tokens_per_rank}: "
                "no expert could ever be capped; lower the floor or raise the bound")
    elif floor != "auto":
        from .calibrate import load  # the file is read once, here: a bad one fails at the boundary

        load(floor)


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def expert_capacity(
    num_tokens: Count, topk: Count, num_experts: int, capacity_factor: float, min_capacity: int = 0
) -> Count:
    """C = max(ceil(T * k / E * gamma), min_capacity), Megatron-Core's formula and float order.

    num_tokens and topk may be 0-dim int64 tensors (a group's token count kept on the device):
    C is then one too, computed in float64 with the same operations, so equal to the host value.
    """
    if isinstance(num_tokens, torch.Tensor) or isinstance(topk, torch.Tensor):
        mean = torch.as_tensor(num_tokens * topk).double() / num_experts
        return torch.ceil(mean * capacity_factor).long().clamp_min(min_capacity)
    return max(math.ceil((num_tokens * topk / num_experts) * capacity_factor), min_capacity)

"""CapacityConfig: every knob of the capacity-aware routing plan, validated at the boundary.

The same dataclass is built from Megatron-LM arguments, from a TransformerConfig and from the
DeepSpeed config JSON; each of those converters lives in its framework's subpackage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
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

    min_capacity: int = 0
    """Decode guard: when T * k / E < min_capacity nothing is dropped, and C is never below it."""

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

    def __post_init__(self) -> None:
        if self.policy is None:  # frozen: resolve the default in place, once
            object.__setattr__(self, "policy", "none" if self.capacity_factor is None else "drop")
        _check_choice("policy", self.policy, POLICIES)
        _check_choice("priority", self.priority, PRIORITIES)
        _check_choice("scope", self.scope, SCOPES)
        _check_choice("backend", self.backend, BACKENDS)
        _check_choice("reroute_weight", self.reroute_weight, REROUTE_WEIGHTS)
        if self.capacity_factor is not None:
            if isinstance(self.capacity_factor, bool) or not isinstance(
                self.capacity_factor, (int, float)
            ):
                raise TypeError(
                    f"capacity_factor must be a positive number or None, "
                    f"got {self.capacity_factor!r}"
                )
            if not math.isfinite(self.capacity_factor) or self.capacity_factor <= 0:
                raise ValueError(
                    f"capacity_factor must be > 0 (or None for dropless), "
                    f"got {self.capacity_factor!r}"
                )
            if self.policy == "none":
                raise ValueError(
                    f"capacity_factor={self.capacity_factor} has no effect with policy='none': "
                    "use policy 'drop', 'reroute' or 'expanded', or capacity_factor=None"
                )
        elif self.policy != "none":
            raise ValueError(
                f"policy={self.policy!r} needs a capacity_factor (gamma > 0); without one the plan "
                "is dropless: set capacity_factor, or use policy 'none' (or leave policy unset)"
            )
        for name in ("min_capacity", "seed", "reroute_rounds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {value!r}")
        if self.reroute_rounds < 1:
            raise ValueError(f"reroute_rounds must be >= 1, got {self.reroute_rounds}")
        if self.min_capacity < 0:
            raise ValueError(f"min_capacity must be >= 0, got {self.min_capacity}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")
        for name in ("renormalize", "apply_in_training"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def is_dropless(self) -> bool:
        """True when the plan is the identity whatever the routing."""
        return self.policy == "none" or self.capacity_factor is None

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

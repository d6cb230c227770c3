"""CapacityAwareGate: DeepSpeed-MoE's TopKGate with the capacity-aware routing plan.

The gate keeps DeepSpeed's router (the same `wg` Linear, input jitter, fp32 softmax, the same
auxiliary loss) but selects the top-k deterministically (no Gumbel sampling of the 2nd expert, no
random token selection) and hands capacity to the core planner, with DeepSpeed's float32 capacity
formula (``deepspeed_capacity``). It returns what MOELayer expects in deepspeed 0.19: the
sparse-route tuple (expert index per route, -1 where dropped; slot in the expert buffer; gate
weight; counts), or the dense (combine_weights, dispatch_mask) form.

Combine weights, by ``renormalize``:
- False (the default, the paper's and Megatron-Core's): a kept route keeps its pre-cap weight,
  the raw softmax score for k = 1 and the score normalised over the token's top-k for k >= 2; a
  token that lost a route keeps less than 1 in total.
- True: a token's kept weights are rescaled to sum to their pre-cap total, which is exactly
  DeepSpeed's ``top2gating`` / ``topkgating`` (normalised over the routes that survive the cap;
  k = 1 is raw either way).

``used_token`` masks tokens out of routing, the expert counts and the auxiliary loss at every k
(DeepSpeed honours it only in ``top1gating``; there the results are DeepSpeed's).

The expert buffer size C must be equal on every rank of the expert-parallel group (the
all-to-all exchanges [E, C, M] blocks): it is the group-wide largest per-expert load of the plan,
agreed with one all_reduce(MAX) of one integer.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.moe.sharded_moe import TopKGate, gumbel_rsample, multiplicative_jitter

from ..config import CapacityConfig, Count
from ..group import RoutingGroup
from ..layout import ExpertLayout
from ..planner import RoutingPlan, plan_routing


def deepspeed_capacity(
    num_tokens: Count, topk: Count, num_experts: int, capacity_factor: float, min_capacity: int = 0
) -> Count:
    """C = max(ceil(fp32(T / E) * fp32(gamma * k)), min_capacity): DeepSpeed's ``_capacity``.

    DeepSpeed multiplies in float32 (a Python float times a 0-dim float32 tensor), which rounds
    differently from Megatron-Core's float64 ``ceil(T * k / E * gamma)`` at some points (T=25,
    E=8, k=4, gamma=1.2: 16 here, 15 there). Host counts: Python and numpy scalars; counts kept
    on the device (0-dim tensors): the same float32 operations in torch, nothing read back.
    """
    if isinstance(num_tokens, torch.Tensor) or isinstance(topk, torch.Tensor):  # on the device
        mean = (torch.as_tensor(num_tokens).double() / num_experts).float()
        product = mean * (torch.as_tensor(topk).double() * capacity_factor).float()
        return torch.ceil(product).long().clamp_min(min_capacity)
    product = np.float32(num_tokens / num_experts) * np.float32(capacity_factor * topk)  # float32 * float32
    return max(math.ceil(product), min_capacity)


class CapacityAwareGate(TopKGate):
    """TopKGate whose capacity decisions come from a CapacityConfig."""

    def __init__(self, model_dim: int, num_experts: int, k: int = 1, *,
                 capacity_config: CapacityConfig, **topk_gate_kwargs: Any) -> None:
        self.check_shape(num_experts, k)
        super().__init__(model_dim, num_experts, k, **topk_gate_kwargs)
        self.capacity_config = capacity_config
        self.num_experts = num_experts
        self.last_plan: Optional[RoutingPlan] = None
        self.plan_observers: list = []
        self._expert_layout: Optional[ExpertLayout] = None

    @staticmethod
    def check_shape(num_experts: int, k: int) -> None:
        """k experts per token out of num_experts: 1 <= k <= num_experts."""
        if not 1 <= k <= num_experts:
            raise ValueError(f"k must be in [1, num_experts={num_experts}], got {k}")

    @classmethod
    def from_topk_gate(cls, gate: TopKGate, capacity_config: CapacityConfig, *,
                       ep_group: Any = None) -> "CapacityAwareGate":
        """A capacity-aware gate sharing `gate`'s trained router weights (the same Parameter).

        ep_group: the layer's expert-parallel group when the gate does not hold it (default: the
        gate's own).
        """
        model_dim = gate.wg.weight.shape[1]
        num_experts = gate.wg.weight.shape[0]
        new = cls(
            model_dim, num_experts, gate.k, capacity_config=capacity_config,
            capacity_factor=gate.capacity_factor, eval_capacity_factor=gate.eval_capacity_factor,
            min_capacity=gate.min_capacity, noisy_gate_policy=gate.noisy_gate_policy,
            drop_tokens=gate.drop_tokens, use_rts=gate.use_rts,
            ep_group=gate.ep_group if ep_group is None else ep_group,
            top2_2nd_expert_sampling=getattr(gate, "top2_2nd_expert_sampling", True),
        )
        new.wg = gate.wg
        new.wall_clock_breakdown = gate.wall_clock_breakdown
        new.train(gate.training)
        return new

    # ---------------------------------------------------------------------------------- helpers

    def _ep(self) -> tuple[int, int]:
        group = self.ep_group
        if group is None or not dist.is_initialized():
            return 0, 1
        return dist.get_rank(group), dist.get_world_size(group)

    def _layout(self) -> ExpertLayout:
        """Experts contiguous per EP rank; built (and checked) once, once the EP group is known."""
        ep_rank, ep_size = self._ep()
        if self._expert_layout is None or self._expert_layout.num_ranks != ep_size:
            per_rank = self.num_experts // ep_size
            self._expert_layout = ExpertLayout.build(
                self.num_experts, torch.arange(self.num_experts) // per_rank,
                range(ep_rank * per_rank, (ep_rank + 1) * per_rank),
            )
        return self._expert_layout

    def _router(self, input: torch.Tensor):
        """(fp32 logits, full softmax scores [S, E], top-k map [S, E])."""
        input_fp32 = input.float()
        if self.noisy_gate_policy == "Jitter" and self.training:
            input_fp32 = multiplicative_jitter(input_fp32, device=input.device)
        logits = F.linear(input_fp32, weight=self.wg.weight.float(), bias=None)
        scores = F.softmax(logits, dim=1)
        selection = logits
        if self.noisy_gate_policy == "RSample" and self.training:
            selection = logits + gumbel_rsample(logits.shape, device=logits.device)
        top = torch.topk(selection, self.k, dim=1).indices
        routing_map = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, top, True)
        return logits, scores, routing_map

    def _aux_loss(self, scores: torch.Tensor, routing_map: torch.Tensor, first_choice) -> torch.Tensor:
        """DeepSpeed's load-balancing loss for the same k (top-2 uses the first choice only)."""
        num_experts = scores.shape[1]
        me = scores.mean(0)
        if self.k == 2:
            ce = F.one_hot(first_choice, num_experts).float().mean(0)
            return (me * ce).mean() * num_experts * num_experts
        ce = routing_map.float().mean(0)
        return (me * ce).mean() * num_experts * num_experts / self.k

    def _plan(self, scores: torch.Tensor, routing_map: torch.Tensor) -> RoutingPlan:
        combine = scores * routing_map
        if self.k > 1:  # DeepSpeed normalises the top-k weights for k >= 2
            combine = combine / combine.sum(1, keepdim=True).clamp_min(torch.finfo(combine.dtype).eps)
        ep_size = self._ep()[1]
        cfg = self.capacity_config
        plan = plan_routing(
            scores, routing_map, cfg, layout=self._layout(), probs=combine, topk=self.k,
            group=RoutingGroup.from_process_group(self.ep_group) if cfg.scope == "global" and ep_size > 1 else None,
            training=self.training, validate=False, capacity_fn=deepspeed_capacity,
        )
        self.last_plan = plan
        for observer in self.plan_observers:
            observer(self, plan)
        return plan

    def _buffer_capacity(self, plan: RoutingPlan) -> torch.Tensor:
        """Slots per expert: the largest planned load in the expert-parallel group (>= 1)."""
        capacity = plan.tokens_per_expert_after.max().clamp_min(1).to(torch.int64)
        if self._ep()[1] > 1:
            dist.all_reduce(capacity, op=dist.ReduceOp.MAX, group=self.ep_group)
        return capacity

    # ---------------------------------------------------------------------------------- forward

    def forward(self, input: torch.Tensor, used_token: Optional[torch.Tensor] = None,
                sparse_routes: bool = False, use_tutel: bool = False):  # noqa: A002 - DeepSpeed's name
        logits, scores, routing_map = self._router(input)
        if used_token is not None:  # masked tokens route nowhere and count for no expert
            routing_map = routing_map & used_token.reshape(-1, 1).bool()
        l_aux = self._aux_loss(scores, routing_map, torch.argmax(logits, dim=1))
        exp_counts = routing_map.sum(0).detach()
        plan = self._plan(scores, routing_map)
        capacity = self._buffer_capacity(plan)
        new_map, weights = plan.routing_map, plan.probs.float()
        # Slot of every planned (token, expert) in its expert's buffer: token order.
        slots = torch.cumsum(new_map.long(), dim=0) - 1
        if not sparse_routes:
            num_slots = int(capacity)
            one_hot = F.one_hot(torch.where(new_map, slots, 0), num_classes=num_slots).float()
            combine_weights = (weights * new_map).unsqueeze(-1) * one_hot  # [S, E, C]
            return l_aux, combine_weights, combine_weights.bool(), exp_counts
        routes = int(new_map.sum(1).max()) if new_map.shape[0] else 0
        order = torch.sort(new_map.to(torch.int8), dim=1, descending=True, stable=True)
        experts = order.indices[:, :routes]  # [S, R]: each token's planned experts first
        kept = order.values[:, :routes].bool()
        indices = torch.where(kept, experts, -1).t().contiguous().to(torch.int32)
        locations = (slots.gather(1, experts) * kept).t().contiguous().to(torch.int32)
        gates = (weights.gather(1, experts) * kept).t().contiguous()
        return l_aux, capacity, self.num_experts, indices, locations, gates, exp_counts

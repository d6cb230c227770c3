"""CapacityAwareTokenDispatcher: Megatron-Core's all-to-all dispatcher with the routing plan.

The plan runs between the router and the first permutation (dispatch_preprocess), on this rank's
tokens, before any communication: everything after it (all-to-all, expert-TP gathers, sorting by
local expert, combine) is the stock dispatcher working on the planned (routing_map, probs).

Scores. Megatron's router returns only the top-k combine weights, while reroute and expanded rank
experts a token did not pick. The MoE layer hands the router's logits to the dispatcher
(capture_router_logits, wired by install()); full scores are the router's score function over all
experts. Assignments the router made are ranked by its own combine weights, exactly as
Megatron-Core's moe_token_drop_policy="probs" ranks them, so scope local with policy drop equals
its capacity drop; other candidates are ranked by their full score.

CUDA-graph decode. Megatron's inference controller switches every MoE layer to drop-and-pad
for CUDA-graph steps (``megatron.core.inference.utils.set_decode_expert_padding`` with capacity
factor E/k: every expert gets T rows per source rank, nothing dropped). A capaware layer whose cap
applies sizes that padding by its plan instead: the router skips Megatron's pad step (the plan
needs its real top-k), each source rank sends exactly min(C, T) rows per expert, zero-weight rows
filling what the plan leaves, with equal all-to-all splits and no copy to the host. Dropless
(γ None), the layer is Megatron's stock E/k padding.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, List, Optional

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher
from megatron.core.transformer.transformer_config import TransformerConfig

from ..config import CapacityConfig
from ..group import RoutingGroup
from ..layout import ExpertLayout
from ..planner import RoutingPlan, plan_routing
from .config import capacity_config_of

PlanObserver = Callable[["CapacityAwareTokenDispatcher", RoutingPlan], None]

_SCORE_FUNCTIONS = {
    "softmax": lambda logits: torch.softmax(logits.float(), dim=-1),
    "sigmoid": lambda logits: torch.sigmoid(logits.float()),
    "sqrtsoftplus": lambda logits: torch.sqrt(torch.nn.functional.softplus(logits.float())),
}


def _check_graph_capture(config: TransformerConfig, cfg: CapacityConfig) -> None:
    """Megatron's guard for its own capacity drop, applied to ours: the capped preprocess step
    sizes the permutation from the plan (a device-to-host copy), which a CUDA graph cannot hold."""
    captured = {getattr(module, "name", module) for module in getattr(config, "cuda_graph_modules", None) or ()}
    if not cfg.is_dropless and "moe_preprocess" in captured:
        raise ValueError(
            "cuda_graph_modules includes moe_preprocess, which is not supported with a capaware "
            "capacity factor (the capped preprocess step copies token counts to the host); "
            "capture moe_router only, or run the capaware layer dropless"
        )


class CapacityAwareTokenDispatcher(MoEAlltoAllTokenDispatcher):
    """All-to-all token dispatcher that caps expert load (arXiv 2503.05066)."""

    def __init__(
        self,
        num_local_experts: int,
        local_expert_indices: List[int],
        config: TransformerConfig,
        pg_collection: Optional[ProcessGroupCollection] = None,
        dispatcher_type: Optional[str] = None,
    ) -> None:
        super().__init__(num_local_experts, local_expert_indices, config, pg_collection)
        # The layer's capaware type carries its CapacityConfig (MoELayer builds this dispatcher
        # while the config reads "alltoall").
        self.capacity_config: CapacityConfig = capacity_config_of(config, dispatcher_type)
        _check_graph_capture(config, self.capacity_config)
        if config.moe_router_score_function not in _SCORE_FUNCTIONS:
            raise ValueError(
                f"moe_router_score_function={config.moe_router_score_function!r} is not supported "
                f"by the capaware dispatcher; use one of {', '.join(_SCORE_FUNCTIONS)}"
            )
        # Where the experts live (contiguous per EP rank), checked once: plans reuse it.
        self.expert_layout = ExpertLayout.build(
            self.num_experts, torch.arange(self.num_experts) // num_local_experts, self.local_expert_indices
        )
        self._routing_group: Optional[RoutingGroup] = None
        # Tensor parallelism without sequence parallelism: the attention TP peers hold the same
        # tokens, which a global plan counts once.
        self._token_copies = None if config.sequence_parallel else getattr(pg_collection, "tp", None)
        self._router_logits: Optional[torch.Tensor] = None
        self._plan_applied = False
        self._padded_rows: Optional[int] = None
        self.last_plan: Optional[RoutingPlan] = None
        self.plan_observers: list[PlanObserver] = []

    def capture_router_logits(self, logits: torch.Tensor) -> None:
        """Called with the router's logits ([S, B, E] or [T, E]) before each dispatch."""
        self._router_logits = logits

    def _full_scores(self, probs: torch.Tensor, routing_map: torch.Tensor) -> torch.Tensor:
        logits, self._router_logits = self._router_logits, None
        if logits is None:
            if self.capacity_config.policy in ("reroute", "expanded"):
                raise RuntimeError(
                    f"policy {self.capacity_config.policy!r} needs the router's scores over all "
                    "experts, but no router logits reached the dispatcher: build the MoE layer "
                    "after capaware_megatron.megatron.install()"
                )
            return torch.where(routing_map, probs, 0).float()
        full = _SCORE_FUNCTIONS[self.config.moe_router_score_function](
            logits.reshape(-1, self.num_experts)
        )
        # Router picks are ranked by its own combine weights (Megatron's "probs" drop order).
        return torch.where(routing_map, probs.float(), full)

    def _group(self) -> Optional[RoutingGroup]:
        if self.capacity_config.scope != "global":
            return None
        if self._routing_group is None:
            self._routing_group = RoutingGroup.from_process_group(
                self.tp_ep_group, copies=self._token_copies)
        return self._routing_group

    @property
    def sizes_padded_step(self) -> bool:
        """Megatron switched the layer to drop-and-pad (CUDA-graph decode) and the cap applies:
        the plan, not Megatron's E/k padding, sizes the step (the router then skips its own)."""
        return self.drop_and_pad and self.capacity_config.caps(self.training)

    def plan(self, routing_map: torch.Tensor, probs: torch.Tensor) -> RoutingPlan:
        """The capacity plan of this rank's tokens; notifies plan_observers."""
        cfg = self.capacity_config
        scores = self._full_scores(probs, routing_map)
        group = self._group()
        if group is not None and self.drop_and_pad:
            # Padded decode runs every EP rank at one token count (Megatron's padded all-to-all
            # needs it): C follows from the shapes, no counts are exchanged.
            group = dataclasses.replace(group, tokens_per_rank=routing_map.shape[0])
        plan = plan_routing(
            scores,
            routing_map,
            cfg,
            layout=self.expert_layout,
            probs=probs,
            topk=self.config.moe_router_topk,
            group=group,
            training=self.training,
            validate=False,
        )
        self.last_plan = plan
        for observer in self.plan_observers:
            observer(self, plan)
        return plan

    def bind_layer(self, layer: torch.nn.Module) -> None:
        """Take train/eval mode from the MoE layer that owns this dispatcher (install() binds it)."""
        self._layer = layer

    @property
    def training(self) -> bool:
        """The owning layer's mode, read at each plan. The dispatcher is no nn.Module, so
        ``layer.eval()`` cannot reach it; a copy of the mode taken in the layer's forward would
        go stale wherever Megatron drives the dispatcher without that forward (its dispatcher
        tests, the EP-overlap schedule's per-stage callables, partial CUDA-graph capture).
        Unbound (a dispatcher built outside a MoELayer): eval, where the cap applies."""
        layer = getattr(self, "_layer", None)
        return False if layer is None else layer.training

    def dispatch_preprocess(
        self, hidden_states: torch.Tensor, routing_map: torch.Tensor, probs: torch.Tensor
    ):
        plan = self.plan(routing_map, probs)
        self._plan_applied = plan.routing_map is not routing_map
        # No expert receives more than C (or all T) of this rank's tokens under the plan.
        self._padded_rows = (
            min(plan.capacity, routing_map.shape[0]) if self.sizes_padded_step else None
        )
        return super().dispatch_preprocess(hidden_states, plan.routing_map, plan.probs)

    def preprocess(self, routing_map: torch.Tensor) -> torch.Tensor:
        if self.drop_and_pad and self._padded_rows is not None:
            return self._padded_preprocess(self._padded_rows)
        tokens_per_expert = super().preprocess(routing_map)
        if self._plan_applied:
            # After the plan the number of routed assignments is no longer T * k: size the
            # permutation buffer from the map, like Megatron-Core's own capacity path does.
            self.num_out_tokens = routing_map.sum()
            # Needed on the host at the first permutation. A layer built for CUDA graphs copies
            # to the host later (before the all-to-all); this eager step copies there instead,
            # so the sync point never precedes the copy (Megatron's own capacity path is refused
            # with graphs; ours is captured only padded, which copies nothing).
            self.cuda_dtoh_point = "before_permutation_1"
            self._maybe_update_cuda_sync_point("before_permutation_1")
        return tokens_per_expert

    def _padded_preprocess(self, capacity: int) -> torch.Tensor:
        """Megatron's drop-and-pad layout with the plan's capacity: every source rank sends
        exactly `capacity` rows per expert (its permutation fills what the plan leaves with
        zero-weight rows), the all-to-all splits are equal, nothing is copied to the host.

        Returns [num_local_experts] rows per local expert (host tensor: EP * TP * capacity)."""
        self.capacity = capacity
        self.num_out_tokens = capacity * self.num_experts
        # [tp_size * ep_size * num_local_experts]: rows each rank sends each local expert.
        self.num_global_tokens_per_local_expert = torch.full(
            (self.num_experts * self.tp_size,), capacity, dtype=torch.long,
            device=self.permute_idx_device,
        )
        return torch.full(
            (self.num_local_experts,), capacity * self.tp_size * self.ep_size, dtype=torch.long
        )

"""CapacityAwareTokenDispatcher: Megatron-Core's all-to-all dispatcher with the routing plan.

The plan runs between the router and the first permutation (dispatch_preprocess), on this rank's
tokens, before any communication: everything after it (all-to-all, expert-TP gathers, sorting by
local expert, combine) is the stock dispatcher working on the planned (routing_map, probs).

Scores. Megatron's router returns only the top-k combine weights, while reroute and expanded rank
experts a token did not pick. The MoE layer hands the router's logits to the dispatcher
(capture_router_logits, wired by install()); full scores are the router's score function over all
experts. Assignments the router made are ranked by its own combine weights, exactly as
Megatron-Core's moe_token_drop_policy="probs" ranks them, so scope local with policy drop equals
its capacity drop; other candidates are ranked, and weighed when placed, by their score as the
router would have weighed it: the bias-free score (an expert bias only picks, as in DeepSeek-V3)
times the token's factor from score to weight (renormalisation over the picks, the top-k
scaling factor). With group-limited routing a token is moved only within the groups of its picks.

CUDA-graph decode. Megatron's inference controller switches every MoE layer to drop-and-pad
for CUDA-graph steps (``megatron.core.inference.utils.set_decode_expert_padding`` with capacity
factor E/k: every expert gets T rows per source rank, nothing dropped). A capaware layer whose cap
applies sizes that padding by its plan instead: the router skips Megatron's pad step (the plan
needs its real top-k), each source rank sends exactly min(C, T) rows per expert, zero-weight rows
filling what the plan leaves, with equal all-to-all splits and no copy to the host. Dropless
(γ None), the layer is Megatron's stock E/k padding. Decode steps plan with the configuration's
decode_capacity_factor when it has one.

Padding. Megatron pads an inference batch to a CUDA graph's size with dummy tokens. The dynamic
inference context publishes the step's real token count in a fixed-address device tensor
(``gpu_view.real_token_count``, which Megatron's own NVLS inference dispatcher reads; install()
binds it here too), and a forward with a padding mask hands it to the router. Rows past the
count, or masked, take no capacity: the plan counts, caps and weighs only real tokens, on the
device, and the shapes stay those of the padded batch.

Floor. min_capacity "auto" or a calibration file's path is resolved once, when the dispatcher's
CapacityConfig is set (at build, or assigned later), to the knee measured for this layer's experts (hidden, FFN per expert-TP rank, dtype,
local experts, gated) on this device (capaware_megatron.calibrate).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, List, Optional

import torch
from megatron.core import utils
from megatron.core.inference.utils import InferenceMode
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher
from megatron.core.transformer.transformer_config import TransformerConfig

from ..calibrate import ExpertShape, device_name, dtype_name, resolve_min_capacity
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


_TINY = torch.finfo(torch.float32).tiny


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


def _layer_floor(cfg: CapacityConfig, config: TransformerConfig, num_local_experts: int,
                 expert_tp: int) -> CapacityConfig:
    """cfg with a calibrated min_capacity ("auto" / a file) resolved for this layer's experts."""
    if isinstance(cfg.min_capacity, int):
        return cfg
    dtype = "bfloat16" if config.bf16 else "float16" if config.fp16 else dtype_name(config.params_dtype)
    shape = ExpertShape(config.hidden_size, config.moe_ffn_hidden_size // expert_tp, dtype,
                        num_local_experts, bool(config.gated_linear_unit))
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    return resolve_min_capacity(cfg, shape, device_name(device))


class CapacityAwareTokenDispatcher(MoEAlltoAllTokenDispatcher):
    """All-to-all token dispatcher that caps expert load (arXiv 2503.05066)."""

    real_token_count: Optional[torch.Tensor] = None
    """[1] int: the real tokens of the current inference step (the rest of the batch is CUDA-graph
    padding), a fixed-address device tensor refreshed by the inference engine every step; read
    while Megatron's InferenceMode is active. Set by set_real_token_count_tensor."""

    inference_max_tokens: Optional[int] = None
    """The most tokens an inference step runs on one rank (the dynamic inference context's
    max_tokens, rounded up to a CUDA-graph size; install() binds it): eager global-scope steps
    under InferenceMode take it as CapacityConfig.max_tokens_per_rank when that is unset."""

    @classmethod
    def set_real_token_count_tensor(cls, tensor: Optional[torch.Tensor]) -> None:
        """Bind the step's real token count (Megatron's ``context.gpu_view.real_token_count``,
        which install() binds for every DynamicInferenceContext; None unbinds)."""
        if tensor is not None and (tensor.numel() != 1 or tensor.is_floating_point()):
            raise ValueError(f"real_token_count must be a one-element integer tensor, got {tuple(tensor.shape)} {tensor.dtype}")
        cls.real_token_count = tensor

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
        self.capacity_config = capacity_config_of(config, dispatcher_type)
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
        # Sequence parallelism splits a step's tokens over the attention TP ranks, in rank order.
        attention_tp = getattr(pg_collection, "tp", None) if config.sequence_parallel else None
        self._first_token_shard = 0 if attention_tp is None else utils.get_pg_rank(attention_tp)
        self._router_logits: Optional[torch.Tensor] = None
        self._padding_mask: Optional[torch.Tensor] = None
        self._plan_applied = False
        self._padded_rows: Optional[int] = None
        self.last_plan: Optional[RoutingPlan] = None
        self.plan_observers: list[PlanObserver] = []

    @property
    def capacity_config(self) -> CapacityConfig:
        """The layer's CapacityConfig, its floor a number (a calibrated one resolved when set)."""
        return self._capacity_config

    @capacity_config.setter
    def capacity_config(self, cfg: CapacityConfig) -> None:
        self._capacity_config = _layer_floor(cfg, self.config, self.num_local_experts, self.tp_size)
        self._decode_config = self._capacity_config.for_decode()  # once, not per decode step

    def capture_router_logits(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> None:
        """Called with the router's logits ([S, B, E] or [T, E]) before each dispatch, and the
        forward's padding mask ([S, B] or [T] bool, True on padding, as Megatron's router reads
        it), if any."""
        self._router_logits = logits
        self._padding_mask = padding_mask

    def _token_mask(self, num_tokens: int, device: torch.device) -> Optional[torch.Tensor]:
        """[T] bool, this rank's real tokens (None: all): not masked as padding, and, in an
        inference step, before the step's real token count (rows of all TP ranks in order under
        sequence parallelism, as Megatron's own routing mask counts them). Device ops only."""
        padding, self._padding_mask = self._padding_mask, None
        mask = None if padding is None else ~padding.reshape(-1).to(device=device, dtype=torch.bool)
        count = type(self).real_token_count
        if count is not None and InferenceMode.is_active():
            first = self._first_token_shard * num_tokens
            real = torch.arange(first, first + num_tokens, device=device) < count.to(device).reshape(())
            mask = real if mask is None else mask & real
        return mask

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
        # The router's weights are its bias-free scores times one factor per token (1 / their
        # sum over the picks where it renormalises, times moe_router_topk_scaling_factor):
        # experts it did not pick are weighed, and ranked, as it would have weighed them.
        picked = probs.float().where(routing_map, 0).sum(-1, keepdim=True)
        factor = picked / full.where(routing_map, 0).sum(-1, keepdim=True).clamp_min(_TINY)
        # Router picks are ranked by its own combine weights (Megatron's "probs" drop order).
        return torch.where(routing_map, probs.float(), full * factor)

    def _eligible(self, routing_map: torch.Tensor) -> Optional[torch.Tensor]:
        """[T, E] bool, the experts a token may be moved to or compete for: with group-limited
        routing (moe_router_num_groups) only the groups holding one of its picks, so that no
        token reaches more groups (devices, nodes) than the router allows; None: all."""
        groups = self.config.moe_router_num_groups
        if not groups or self.capacity_config.policy not in ("reroute", "expanded"):
            return None
        num_tokens = routing_map.shape[0]
        in_group = routing_map.view(num_tokens, groups, -1).any(-1, keepdim=True)
        return in_group.expand(-1, -1, self.num_experts // groups).reshape(num_tokens, -1)

    def _group(self) -> Optional[RoutingGroup]:
        if self.capacity_config.scope != "global":
            return None
        if self._routing_group is None:
            self._routing_group = RoutingGroup.from_process_group(
                self.tp_ep_group, copies=self._token_copies)
        return self._routing_group

    @property
    def step_config(self) -> CapacityConfig:
        """The configuration of the step running now: decode's (decode_capacity_factor) when
        Megatron switched the layer to drop-and-pad for CUDA-graph decode; in an inference step
        of eager global scope, bounded by the engine's most tokens per step unless it has a bound."""
        cfg = self._decode_config if self.drop_and_pad else self._capacity_config
        bound = type(self).inference_max_tokens
        if (cfg.scope == "global" and cfg.max_tokens_per_rank is None and bound is not None
                and not self.drop_and_pad and InferenceMode.is_active()):
            cfg = dataclasses.replace(cfg, max_tokens_per_rank=bound)
        return cfg

    @property
    def sizes_padded_step(self) -> bool:
        """Megatron switched the layer to drop-and-pad (CUDA-graph decode) and the cap applies:
        the plan, not Megatron's E/k padding, sizes the step (the router then skips its own)."""
        return self.drop_and_pad and self.step_config.caps(self.training)

    def plan(self, routing_map: torch.Tensor, probs: torch.Tensor) -> RoutingPlan:
        """The capacity plan of this rank's tokens; notifies plan_observers."""
        cfg = self.step_config
        scores = self._full_scores(probs, routing_map)
        token_mask = self._token_mask(routing_map.shape[0], routing_map.device)
        if not cfg.caps(self.training):
            token_mask = None  # uncapped, the stock dispatcher's path, token for token
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
            token_mask=token_mask,
            eligible=self._eligible(routing_map),
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
        num_tokens = routing_map.shape[0]
        bound = num_tokens if plan.capacity_bound is None else plan.capacity_bound
        self._padded_rows = min(bound, num_tokens) if self.sizes_padded_step else None
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

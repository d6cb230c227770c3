"""install() / uninstall(): make TransformerConfig(moe_token_dispatcher_type="capaware") work.

Megatron-Core has no dispatcher registry: MoELayer.__init__ picks the dispatcher class in an
if/elif over the type string. install() wraps MoELayer.__init__ so that, for type "capaware", the
stock constructor runs as for "alltoall" with CapacityAwareTokenDispatcher in place of
MoEAlltoAllTokenDispatcher (everything else, shared-expert overlap included, is stock), then
hands the router's logits to the dispatcher. It also wraps the Megatron code that tests the
string "alltoall" (TransformerConfig.__post_init__, TransformerLayer.__init__, the EP-overlap
schedule's should_free_input) so that it treats "capaware" as the "alltoall" dispatcher it is,
and DynamicInferenceContext.__init__ so that each context hands the dispatcher its step's real
token count (padding rows take no capacity) and its most tokens per step (eager global scope's
token bound).
Every replaced symbol is recorded once and carries ``__wrapped__``; uninstall() restores them.
Idempotent.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Any, Iterator

from ._compat import require_megatron_core
from .config import DISPATCHER_TYPE

logger = logging.getLogger(__name__)

_PATCH_MARKER = "__capaware_patched__"
_patches: list[tuple[Any, str, Any]] = []  # (owner, attribute, original)


def is_installed() -> bool:
    return bool(_patches)


def install() -> None:
    """Register the capaware dispatcher with Megatron-Core's MoELayer (idempotent)."""
    if _patches:
        return
    require_megatron_core()
    from megatron.core.inference.contexts import dynamic_context
    from megatron.core.models.common import utils as common_utils
    from megatron.core.transformer import transformer_layer
    from megatron.core.transformer.moe import moe_layer
    from megatron.core.transformer.transformer_config import TransformerConfig

    _replace(moe_layer.MoELayer, "__init__", _wrap_moe_layer_init(moe_layer.MoELayer.__init__))
    # Megatron's code that tests the string "alltoall" sees it for capaware, which is that
    # dispatcher: the config checks (shared-expert overlap, EP communication overlap, ...), the
    # transformer layer's CUDA-graph recompute choice, the EP-overlap schedule's memory frees.
    _replace(TransformerConfig, "__post_init__",
             _presenting_alltoall(TransformerConfig.__post_init__, _argument(0, "self")))
    _replace(transformer_layer.TransformerLayer, "__init__",
             _presenting_alltoall(transformer_layer.TransformerLayer.__init__, _argument(1, "config")))
    _replace(common_utils, "should_free_input",
             _presenting_alltoall(common_utils.should_free_input, _argument(2, "config")))
    # Every dynamic inference context publishes its step's real token count to the dispatcher,
    # as Megatron's own NVLS inference dispatcher receives it (padding rows take no capacity),
    # and its most tokens per step (a bound for eager global scope).
    _replace(dynamic_context.DynamicInferenceContext, "__init__",
             _binding_inference_context(dynamic_context.DynamicInferenceContext.__init__))
    logger.info("capaware: MoELayer builds CapacityAwareTokenDispatcher for type %r", DISPATCHER_TYPE)


def uninstall() -> None:
    """Restore every symbol install() replaced."""
    while _patches:
        owner, name, original = _patches.pop()
        setattr(owner, name, original)


@contextlib.contextmanager
def installed() -> Iterator[None]:
    """install() for the duration of a block (tests)."""
    already = is_installed()
    install()
    try:
        yield
    finally:
        if not already:
            uninstall()


def _replace(owner: Any, name: str, replacement: Any) -> None:
    original = getattr(owner, name)
    if getattr(original, _PATCH_MARKER, False):
        return
    setattr(replacement, _PATCH_MARKER, True)
    replacement.__wrapped__ = original
    _patches.append((owner, name, original))
    setattr(owner, name, replacement)


class _RouterLogitsTap:
    """Replaces a router's bound ``routing`` on the instance: passes the logits on, unchanged.

    When the dispatcher sizes a padded decode step itself, the router runs without Megatron's
    capacity step (set there by set_decode_expert_padding; capaware refuses it otherwise), so
    the plan sees the router's real top-k instead of an all-ones pad mask.

    Holds the router and dispatcher themselves (no bound method), so deep copies of the layer
    tap into their own copies.
    """

    def __init__(self, router: Any, dispatcher: Any) -> None:
        self.router = router
        self.dispatcher = dispatcher

    def __call__(self, logits, *args, **kwargs):
        padding_mask = kwargs.get("padding_mask", args[0] if args else None)
        self.dispatcher.capture_router_logits(logits, padding_mask)
        routing = functools.partial(type(self.router).routing, self.router, logits, *args, **kwargs)
        if not self.dispatcher.sizes_padded_step:
            return routing()
        config = self.router.config
        factor = config.moe_expert_capacity_factor
        config.moe_expert_capacity_factor = None
        try:
            return routing()
        finally:
            config.moe_expert_capacity_factor = factor


# id(config) -> the capaware type of a config presented as "alltoall" right now (nested blocks
# see the type of the outermost one).
_presented: dict[int, Any] = {}


def _capaware_type(config: Any) -> Any:
    """The config's capaware dispatcher type, also while it is presented as "alltoall"; else
    None."""
    dispatcher_type = getattr(config, "moe_token_dispatcher_type", None)
    if dispatcher_type == DISPATCHER_TYPE:
        return dispatcher_type
    return _presented.get(id(config))


@contextlib.contextmanager
def _as_alltoall(config: Any) -> Iterator[Any]:
    """Present the config as type "alltoall" (Megatron's code tests that string) for a block;
    yields, and then restores, the capaware type it had (which carries the CapacityConfig)."""
    if id(config) in _presented:
        yield _presented[id(config)]
        return
    dispatcher_type = config.moe_token_dispatcher_type
    config.moe_token_dispatcher_type = "alltoall"
    _presented[id(config)] = dispatcher_type
    try:
        yield dispatcher_type
    finally:
        del _presented[id(config)]
        config.moe_token_dispatcher_type = dispatcher_type


def _presenting_alltoall(function: Any, config_of: Any) -> Any:
    """`function` with the config ``config_of(args, kwargs)`` presented as "alltoall" while it
    runs, when that config is a capaware one."""

    @functools.wraps(function)
    def wrapped(*args: Any, **kwargs: Any):
        config = config_of(args, kwargs)
        if _capaware_type(config) is None:
            return function(*args, **kwargs)
        with _as_alltoall(config):
            return function(*args, **kwargs)

    return wrapped


def _binding_inference_context(original_init):
    @functools.wraps(original_init)
    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        from .dispatcher import CapacityAwareTokenDispatcher

        count = getattr(getattr(self, "gpu_view", None), "real_token_count", None)
        if count is not None:
            CapacityAwareTokenDispatcher.set_real_token_count_tensor(count)
        max_tokens = getattr(self, "max_tokens", None)
        if isinstance(max_tokens, int) and hasattr(self, "round_up_tokens"):
            # A step's rows are its tokens rounded up to a CUDA-graph size: at most this many.
            CapacityAwareTokenDispatcher.inference_max_tokens = self.round_up_tokens(max_tokens)

    return __init__


def _bind_type(dispatcher_class: Any, dispatcher_type: Any) -> Any:
    """The dispatcher constructor MoELayer calls, told the layer's capaware type."""
    return functools.partial(dispatcher_class, dispatcher_type=dispatcher_type)


def _argument(position: int, name: str) -> Any:
    """Picks a call's argument by position or keyword."""
    return lambda args, kwargs: kwargs[name] if name in kwargs else args[position]


def _wrap_moe_layer_init(original_init):
    @functools.wraps(original_init)
    def __init__(self, config, *args, **kwargs):
        if _capaware_type(config) is None:
            return original_init(self, config, *args, **kwargs)
        from megatron.core.transformer.moe import moe_layer

        from .config import check_megatron_conflicts
        from .dispatcher import CapacityAwareTokenDispatcher

        check_megatron_conflicts(config)
        stock_class = moe_layer.MoEAlltoAllTokenDispatcher
        # The stock constructor's "alltoall" branch, building our subclass; restored at once
        # (the dispatcher reads its CapacityConfig from the type it was built with).
        with _as_alltoall(config) as dispatcher_type:
            moe_layer.MoEAlltoAllTokenDispatcher = _bind_type(CapacityAwareTokenDispatcher, dispatcher_type)
            try:
                original_init(self, config, *args, **kwargs)
            finally:
                moe_layer.MoEAlltoAllTokenDispatcher = stock_class
        self.router.routing = _RouterLogitsTap(self.router, self.token_dispatcher)
        self.token_dispatcher.bind_layer(self)  # its mode is the layer's, whoever drives it

    return __init__

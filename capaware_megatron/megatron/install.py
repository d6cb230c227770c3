"""install() / uninstall(): make TransformerConfig(moe_token_dispatcher_type="capaware") work.

Megatron-Core has no dispatcher registry: MoELayer.__init__ picks the dispatcher class in an
if/elif over the type string. install() wraps MoELayer.__init__ so that, for type "capaware", the
stock constructor runs as for "alltoall" with CapacityAwareTokenDispatcher in place of
MoEAlltoAllTokenDispatcher (everything else, shared-expert overlap included, is stock), then
hands the router's logits to the dispatcher. It also wraps TransformerConfig.__post_init__ so
that Megatron's checks treat "capaware" as the "alltoall" dispatcher it is. Every replaced symbol is recorded once and carries
``__wrapped__``; uninstall() restores them. Idempotent.
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
    from megatron.core.transformer.moe import moe_layer
    from megatron.core.transformer.transformer_config import TransformerConfig

    _replace(moe_layer.MoELayer, "__init__", _wrap_moe_layer_init(moe_layer.MoELayer.__init__))
    _replace(TransformerConfig, "__post_init__", _wrap_config_post_init(TransformerConfig.__post_init__))
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

    Holds the router and dispatcher themselves (no bound method), so deep copies of the layer
    tap into their own copies.
    """

    def __init__(self, router: Any, dispatcher: Any) -> None:
        self.router = router
        self.dispatcher = dispatcher

    def __call__(self, logits, *args, **kwargs):
        self.dispatcher.capture_router_logits(logits)
        return type(self.router).routing(self.router, logits, *args, **kwargs)


@contextlib.contextmanager
def _as_alltoall(config: Any) -> Iterator[Any]:
    """Present the config as type "alltoall" (Megatron's code tests that string) for a block;
    yields, and then restores, the capaware type it had (which carries the CapacityConfig)."""
    dispatcher_type = config.moe_token_dispatcher_type
    config.moe_token_dispatcher_type = "alltoall"
    try:
        yield dispatcher_type
    finally:
        config.moe_token_dispatcher_type = dispatcher_type


def _bind_type(dispatcher_class: Any, dispatcher_type: Any) -> Any:
    """The dispatcher constructor MoELayer calls, told the layer's capaware type."""
    return functools.partial(dispatcher_class, dispatcher_type=dispatcher_type)


def _sync_dispatcher_mode(layer: Any, _args: Any) -> None:
    """Forward pre-hook: the dispatcher (no nn.Module) follows the layer's train/eval mode."""
    layer.token_dispatcher.training = layer.training


def _wrap_config_post_init(original_post_init):
    """TransformerConfig's checks accept every option valid for "alltoall" for "capaware" too
    (shared-expert overlap, EP communication overlap, ...): capaware is that dispatcher."""

    @functools.wraps(original_post_init)
    def __post_init__(self):
        if getattr(self, "moe_token_dispatcher_type", None) != DISPATCHER_TYPE:
            return original_post_init(self)
        with _as_alltoall(self):
            return original_post_init(self)

    return __post_init__


def _wrap_moe_layer_init(original_init):
    @functools.wraps(original_init)
    def __init__(self, config, *args, **kwargs):
        if getattr(config, "moe_token_dispatcher_type", None) != DISPATCHER_TYPE:
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
        self.token_dispatcher.training = self.training  # a new layer trains until .eval()
        self.register_forward_pre_hook(_sync_dispatcher_mode)

    return __init__

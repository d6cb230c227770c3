"""Import Megatron-Core with a clear message when it is missing or of an unsupported version."""

from __future__ import annotations

SUPPORTED = ((0, 19), (0, 20))  # [min, max): the dispatcher contract this plugin targets


def require_megatron_core() -> None:
    """Raise ImportError naming the extra to install, or the supported range."""
    try:
        from megatron.core import package_info
    except ImportError as err:
        raise ImportError(
            "capaware_megatron.megatron needs megatron-core: pip install "
            "'capaware_megatron[megatron]' (on Python 3.11: pip install --no-deps "
            "--ignore-requires-python megatron-core==0.19.2 numpy 'packaging>=24.2')"
        ) from err
    version = (package_info.MAJOR, package_info.MINOR)
    if not SUPPORTED[0] <= version < SUPPORTED[1]:
        raise ImportError(
            f"capaware_megatron.megatron supports megatron-core "
            f"{'.'.join(map(str, SUPPORTED[0]))}.x, found {package_info.__shortversion__}"
        )


def patch_typing_override() -> None:
    """megatron.training uses typing.override (Python 3.12+); give 3.11 the backport."""
    import typing

    if not hasattr(typing, "override"):
        import typing_extensions

        typing.override = typing_extensions.override

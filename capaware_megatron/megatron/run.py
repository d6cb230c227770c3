"""Run an unmodified Megatron-LM script with the capaware dispatcher available.

    python -m capaware_megatron.megatron.run pretrain_gpt.py --moe-token-dispatcher capaware \
        --capaware-capacity-factor 1.5 ...
    torchrun --nproc-per-node 8 -m capaware_megatron.megatron.run pretrain_gpt.py ...

It installs the plugin, adds the --capaware-* arguments to whatever extra_args_provider the script
passes to megatron.training, makes the parsed CapacityConfig the default of every capaware MoE
layer, then runs the script as __main__.
"""

from __future__ import annotations

import functools
import runpy
import sys
from typing import Optional, Sequence

from ._compat import patch_typing_override
from .arguments import add_capaware_args, compose_args_providers, validate_capaware_args
from .config import set_default_capacity_config
from .install import _replace, install
from .training_hooks import install_monitor_hooks


def install_training_hooks() -> None:
    """Wrap megatron.training.arguments.parse_args: our arguments in, our config out."""
    patch_typing_override()
    from megatron.training import arguments

    original = arguments.parse_args

    @functools.wraps(original)
    def parse_args(extra_args_provider=None, ignore_unknown_args=False):
        provider = compose_args_providers(extra_args_provider, add_capaware_args)
        args = original(provider, ignore_unknown_args)
        set_default_capacity_config(validate_capaware_args(args))
        install_monitor_hooks(args)
        return args

    _replace(arguments, "parse_args", parse_args)


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        raise SystemExit(0 if argv else 2)
    script, script_args = argv[0], argv[1:]
    install()
    install_training_hooks()
    sys.argv = [script, *script_args]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()

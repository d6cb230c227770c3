"""Run an unmodified Megatron-LM script with the capaware dispatcher available.

    python -m capaware_megatron.megatron.run pretrain_gpt.py --moe-token-dispatcher capaware \
        --capaware-capacity-factor 1.5 ...
    torchrun --nproc-per-node 8 -m capaware_megatron.megatron.run /path/to/Megatron-LM/pretrain_gpt.py ...
    python -m capaware_megatron.megatron.run -m examples.inference.launch_inference_server ...

Like ``python SCRIPT`` the script's own folder goes first on sys.path (Megatron-LM's scripts
import their neighbours, e.g. gpt_builders); like ``python -m MODULE`` a module runs from the
current directory.

It installs the plugin, adds the --capaware-* arguments to whatever extra_args_provider the script
passes to megatron.training, makes the parsed CapacityConfig the default of every capaware MoE
layer, then runs the script as __main__.
"""

from __future__ import annotations

import functools
import os
import runpy
import sys
from typing import Optional, Sequence

from ._compat import patch_typing_override
from .arguments import add_capaware_args, compose_args_providers, validate_capaware_args
from .config import set_default_capacity_config
from .install import _replace, install
from .monitoring import configure_monitor, install_monitor_hooks


def install_training_hooks() -> None:
    """Wrap megatron.training.arguments.parse_args (our arguments in, our config out) and the
    loop functions the load monitor hooks into, before the script imports any of them."""
    patch_typing_override()
    from megatron.training import arguments

    original = arguments.parse_args

    @functools.wraps(original)
    def parse_args(extra_args_provider=None, ignore_unknown_args=False):
        provider = compose_args_providers(extra_args_provider, add_capaware_args)
        args = original(provider, ignore_unknown_args)
        set_default_capacity_config(validate_capaware_args(args))
        configure_monitor(args)
        return args

    _replace(arguments, "parse_args", parse_args)
    install_monitor_hooks()


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        raise SystemExit(0 if argv else 2)
    as_module = argv[0] == "-m"
    if as_module and len(argv) < 2:
        raise SystemExit("capaware_megatron.megatron.run: -m needs a module name")
    target, target_args = (argv[1], argv[2:]) if as_module else (argv[0], argv[1:])
    if not as_module and not os.path.isfile(target):
        raise SystemExit(f"capaware_megatron.megatron.run: no such script: {target}")
    install()
    install_training_hooks()
    if as_module:
        sys.argv = [target, *target_args]
        sys.path.insert(0, os.getcwd())
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    else:
        sys.argv = [target, *target_args]
        sys.path.insert(0, os.path.dirname(os.path.abspath(target)))
        runpy.run_path(target, run_name="__main__")


if __name__ == "__main__":
    main()

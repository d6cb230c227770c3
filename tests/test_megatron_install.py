"""install()/uninstall(): idempotent, reversible; clear errors without megatron-core."""

import subprocess
import sys

import pytest

pytest.importorskip("megatron.core")

import capaware_megatron.megatron as capaware  # noqa: E402


def test_install_is_idempotent_and_reversible():
    from megatron.core.transformer.moe.moe_layer import MoELayer

    stock_init = MoELayer.__init__
    was_installed = capaware.is_installed()
    capaware.uninstall()
    assert MoELayer.__init__ is stock_init or was_installed
    stock_init = MoELayer.__init__
    with capaware.installed():
        patched = MoELayer.__init__
        assert patched is not stock_init and patched.__wrapped__ is stock_init
        capaware.install()
        assert MoELayer.__init__ is patched
    assert MoELayer.__init__ is stock_init
    if was_installed:
        capaware.install()


def test_without_install_megatron_rejects_the_type():
    code = """
import warnings; warnings.filterwarnings("ignore")
import torch
from capaware_megatron.megatron import cpu_shims; cpu_shims.apply()
from megatron.core import parallel_state
import torch.distributed as dist
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
parallel_state.initialize_model_parallel()
import sys; sys.path.insert(0, "tests")
import megatron_harness as mh
try:
    mh.moe_layer(mh.Layout(world_size=1), "capaware")
except ValueError as err:
    print("REJECTED", err)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "REJECTED Unsupported token dispatcher type: capaware" in out.stdout, out.stderr[-2000:]


def test_missing_megatron_core_names_the_extra():
    code = """
import sys
sys.modules["megatron"] = None  # as if megatron-core were not installed
import capaware_megatron.megatron as capaware
try:
    capaware.install()
except ImportError as err:
    print("IMPORT ERROR:", err)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "capaware_megatron[megatron]" in out.stdout, out.stdout + out.stderr


def test_unsupported_megatron_version(monkeypatch):
    from megatron.core import package_info

    from capaware_megatron.megatron._compat import require_megatron_core

    monkeypatch.setattr(package_info, "MINOR", 14)
    monkeypatch.setattr(package_info, "__shortversion__", "0.14.0")
    with pytest.raises(ImportError, match="supports megatron-core 0.19.x, found 0.14.0"):
        require_megatron_core()


def test_conflict_detected_when_building_in_code():
    from capaware_megatron.megatron.config import capacity_config_of

    class Config:
        moe_expert_capacity_factor = 1.0

    with pytest.raises(ValueError, match="moe_expert_capacity_factor=1.0"):
        capacity_config_of(Config())

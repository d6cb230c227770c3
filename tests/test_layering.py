"""DESIGN.md's layering: the core needs only torch; each framework is imported lazily and a
missing one names the extra to install."""

import os
import subprocess
import sys

BLOCKED = """
import sys
for name in ("megatron", "deepspeed", "wandb", "triton", "tensorboard", "matplotlib", "tqdm",
             "transformers", "modelopt", "lm_eval"):
    sys.modules[name] = None  # as if not installed
"""


def _run(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # a plain CPU process
    return subprocess.run([sys.executable, "-c", BLOCKED + code], capture_output=True, text=True,
                          timeout=120, env=env)


def test_core_and_plugin_packages_import_with_torch_alone():
    out = _run("""
import torch
import capaware_megatron, capaware_megatron.megatron, capaware_megatron.deepspeed, capaware_megatron.monitor
import capaware_megatron.figures, capaware_megatron.quiet, capaware_megatron.hf, capaware_megatron.lm_eval
from capaware_megatron import CapacityConfig, plan_routing
from capaware_megatron.synthetic import skewed_routing
scores, routing_map = skewed_routing(64, 8, 2, skew=2.0)
plan = plan_routing(scores, routing_map, CapacityConfig(1.0, backend="auto"))
assert int(plan.num_dropped) > 0
print("CORE OK")
""")
    assert "CORE OK" in out.stdout, out.stderr[-2000:]


def test_missing_frameworks_name_their_extra():
    out = _run("""
import capaware_megatron.deepspeed as ds
import capaware_megatron.megatron as mg
import capaware_megatron.figures as figures
import capaware_megatron.hf as hf
import capaware_megatron.lm_eval as lm_eval
from capaware_megatron import CapacityConfig, plan_routing
from capaware_megatron.synthetic import skewed_routing
for what, call in [
    ("deepspeed", lambda: ds.apply(None, {})),
    ("megatron", mg.install),
    ("triton", lambda: plan_routing(*skewed_routing(8, 4, 2), CapacityConfig(1.0, backend="triton"))),
    ("matplotlib", lambda: figures.load_heatmap([[1.0]], [[1.0]])),
    ("transformers", lambda: hf.inspect_checkpoint(".")),
    ("lm_eval", lambda: lm_eval.MegatronLM),
]:
    try:
        call()
    except ImportError as err:
        print(what, "->", err)
""")
    assert "deepspeed -> " in out.stdout and "capaware_megatron[deepspeed]" in out.stdout, out.stdout + out.stderr
    assert "capaware_megatron[megatron]" in out.stdout
    assert "capaware_megatron[triton]" in out.stdout
    assert "matplotlib -> " in out.stdout and "capaware_megatron[figures]" in out.stdout
    assert "transformers -> " in out.stdout and "capaware_megatron[hf]" in out.stdout
    assert "lm_eval -> " in out.stdout and "capaware_megatron[lm-eval]" in out.stdout

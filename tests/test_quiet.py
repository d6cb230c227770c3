"""Quiet runs: the frameworks' notices about missing accelerators and deprecations are filtered
where they are raised, in the process and in its gloo workers; --verbose keeps them; nothing else
is hidden."""

import subprocess
import sys

import pytest

pytest.importorskip("megatron.core")

SCRIPT = """
import logging, sys, warnings
from capaware_megatron.quiet import quiet_frameworks
from capaware_megatron.multiprocess import run_gloo

def worker(rank, world_size):
    import megatron.core.optimizer  # warns: Transformer Engine and Apex are not installed
    warnings.warn("a warning of the user's own", UserWarning)
    return rank

if __name__ == "__main__":
    quiet_frameworks(verbose=sys.argv[1] == "verbose")
    import megatron.core.optimizer
    model_logger = logging.getLogger("megatron.core.models.gpt.gpt_model")
    model_logger.warning("GPTModel IS DEPRECATED. GPTModel is only accepting critical bug fixes")
    model_logger.warning("a real problem of the model")
    assert run_gloo(worker, 1) == [0]
"""


@pytest.mark.parametrize("mode", ["quiet", "verbose"])
def test_framework_notices_are_filtered_at_the_source(tmp_path, mode):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    out = subprocess.run([sys.executable, str(script), mode], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    noise = ("Transformer Engine and Apex are not installed", "GPTModel IS DEPRECATED")
    shown = [message for message in noise if message in out.stderr]
    assert shown == ([] if mode == "quiet" else list(noise)), out.stderr[-3000:]
    assert "a real problem of the model" in out.stderr
    assert out.stderr.count("UserWarning: a warning of the user's own") == 1  # the worker still warns

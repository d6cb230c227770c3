"""The package builds from pyproject.toml: a wheel with the package and the kernels, no tests."""

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import capaware_megatron

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_holds_the_package_and_the_kernels_and_no_tests(tmp_path):
    # Built from a copy: setuptools' build/ folder in the tree would keep files deleted since.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "out", "*.egg-info",
                                                                "__pycache__", "checkpoint"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path), str(source)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    (wheel,) = tmp_path.glob("capaware_megatron-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    packages = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert packages == {"capaware_megatron"}, packages  # no top-level kernels/ or tests/
    for module in ("planner.py", "kernels/routing_plan.py", "kernels/permute.py", "ops/reroute.py",
                   "figures/plots.py", "megatron/dispatcher.py", "deepspeed/gate.py", "monitor/sinks.py",
                   "hf/convert.py", "hf/evaluation.py", "lm_eval/adapter.py"):
        assert f"capaware_megatron/{module}" in names, module
    assert not any("/tests/" in name or name.startswith("tests/") for name in names)
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("/METADATA"))).decode()
    assert re.search(rf"^Version: {re.escape(capaware_megatron.__version__)}$", metadata, re.M)
    for extra in ("megatron", "deepspeed", "triton", "wandb", "figures", "hf", "lm-eval", "dev", "all"):
        assert f"Provides-Extra: {extra}" in metadata
    assert "Requires-Dist: torch\n" in metadata  # unpinned: users bring their own build


def test_gpu_check_refuses_clearly_without_a_gpu(tmp_path):
    """`make gpu-check` needs a python whose torch sees CUDA; without one it says so and exits 2."""
    import torch

    if torch.cuda.is_available():
        return  # on a GPU machine the check itself runs (make gpu-check)
    out = subprocess.run(["bash", str(ROOT / "examples" / "benchmarks" / "gpu_check.sh")],
                         env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin", "OUT": str(tmp_path / "x.txt")},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "sees no CUDA device" in out.stderr
    assert not (tmp_path / "x.txt").exists()

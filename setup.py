"""capaware_megatron: capacity-aware MoE inference for Megatron-Core and DeepSpeed-MoE.

torch is a requirement but deliberately unpinned: users bring their own (CUDA) build.
The CPU development stack is pinned in constraints-cpu.txt instead.
"""

from setuptools import setup

EXTRAS = {
    # On Python 3.11 megatron-core>=0.17 must be installed with --no-deps --ignore-requires-python
    # (see README); on 3.12+ this extra installs it normally.
    "megatron": ["megatron-core>=0.19,<0.20", "numpy", "packaging>=24.2"],
    "deepspeed": ["deepspeed>=0.19,<0.20"],
    "triton": ["triton>=3.5"],
    "wandb": ["wandb>=0.20", "numpy", "pillow"],
    "dev": ["pytest>=8", "hypothesis>=6.100", "numpy", "pytest-timeout"],
}
EXTRAS["all"] = sorted({req for reqs in EXTRAS.values() for req in reqs})

setup(
    name="capaware_megatron",
    version="0.1.0",
    description="Capacity-Aware Inference (arXiv 2503.05066) for Megatron-Core and DeepSpeed-MoE",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[
        "capaware_megatron",
        "capaware_megatron.deepspeed",
        "capaware_megatron.kernels",
        "capaware_megatron.megatron",
        "capaware_megatron.monitor",
    ],
    # The top-level folder kernels/ ships as capaware_megatron.kernels: no generic top-level
    # module named `kernels` lands in site-packages.
    package_dir={"capaware_megatron.kernels": "kernels"},
    install_requires=["torch"],
    extras_require=EXTRAS,
)

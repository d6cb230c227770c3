# Everything a fresh machine needs: `make demo`, `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.setup-done
PYTEST_ARGS ?=

.PHONY: setup test demo train bench gpu-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints-cpu.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: the CPU wheel on local disk.
	$(PY) -m pip install -q -c constraints-cpu.txt torch
	# megatron-core 0.19.2 declares Python>=3.12 but its cp311 wheel runs on 3.11.
	$(PY) -m pip install -q -c constraints-cpu.txt --no-deps --ignore-requires-python megatron-core
	$(PY) -m pip install -q -c constraints-cpu.txt numpy "packaging>=24.2"
	DS_BUILD_OPS=0 $(PY) -m pip install -q -c constraints-cpu.txt -e ".[deepspeed,triton,wandb,figures,hf,lm-eval,dev]"
	touch $(STAMP)

test: setup
	$(PY) -m pytest tests $(PYTEST_ARGS)

demo: setup
	$(PY) examples/tiny_moe/demo.py

train: setup
	$(PY) examples/tiny_moe/train.py --steps 1200 --batch-size 32 --seed 1234

bench: setup
	$(PY) examples/benchmarks/bench_moe_layer.py
	$(PY) examples/benchmarks/bench_planner.py
	$(PY) examples/benchmarks/bench_reroute.py
	$(PY) examples/benchmarks/bench_decode.py

# On a machine with a GPU: kernels compiled for it, CUDA-graph tests, planner benchmark; one
# results file named after the device. PYTHON must be a python whose torch sees CUDA.
gpu-check:
	PYTHON=$(PYTHON) bash examples/benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) build *.egg-info

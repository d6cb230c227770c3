#!/usr/bin/env bash
# The CPU demo: expert parallelism over 2 gloo processes on this machine (no GPU, no download).
set -euo pipefail
cd "$(dirname "$0")/.."
make setup
exec .venv/bin/python examples/tiny_moe/demo.py "$@"

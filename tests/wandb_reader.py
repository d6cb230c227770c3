"""Read an offline W&B run back (what a W&B user would see in its history)."""

import json
import os
import subprocess
import sys
from pathlib import Path


def history(run_dir: Path) -> list[dict]:
    """The history rows of the one offline run under `run_dir`, in logging order."""
    run_file = next(Path(run_dir).rglob("*.wandb"))
    command = ["leet", "inspect", "--json", str(run_file)]
    out = subprocess.run([sys.executable, "-m", "wandb", *command], capture_output=True, text=True,
                         timeout=120)
    if out.returncode != 0:  # older CLIs: the binary only
        out = subprocess.run([os.path.join(os.path.dirname(sys.executable), "wandb"), *command],
                             capture_output=True, text=True, timeout=120)
    rows = [json.loads(line)["history"]["item"] for line in out.stdout.splitlines()
            if '"type":"history"' in line]
    assert rows, out.stderr[-2000:]
    return rows


def files(run_dir: Path) -> Path:
    """The run's files folder (tables and images logged by path)."""
    return next(Path(run_dir).rglob("files"))

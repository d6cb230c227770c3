"""The knee of an expert's GEMM time: the row count below which cutting rows saves no time.

Under a small batch (decode) an expert's two GEMMs are bound by reading its weights, not by its
rows: below some row count the time stops falling, so a cap that cuts an expert there loses
tokens and saves nothing. This module measures, on the device at hand, a layer's expert MLP
(fc1 H -> F, x2 with a gated linear unit, the activation, fc2 F -> H, for each of the rank's m
experts in turn, as Megatron's SequentialMLP runs them) at row counts 1..R, finds the knee and
writes it to a small JSON that a CapacityConfig reads as its floor (``min_capacity: "auto"`` or
the file's path):

    python -m capaware_megatron.calibrate --hidden 4096 --ffn 14336 --dtype bfloat16 \\
        --experts-per-rank 2 --gated --out calibration.json

The knee is the largest measured row count whose median time is within ``tolerance`` of the
fewest rows' time. A file holds entries for several shapes and devices; a new measurement of
the same shape on the same device replaces the old one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from .config import CapacityConfig

FORMAT = "capaware-calibration/1"
DEFAULT_PATH_ENV = "CAPAWARE_CALIBRATION"
DEFAULT_PATH = Path("~/.cache/capaware_megatron/calibration.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ExpertShape:
    """One MoE layer's experts on one rank: hidden H, FFN F, dtype, m experts, gated fc1."""

    hidden: int
    ffn: int
    dtype: str
    experts_per_rank: int
    gated: bool = False

    def __post_init__(self) -> None:
        for name in ("hidden", "ffn", "experts_per_rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")


@dataclass(frozen=True)
class Calibration:
    """A measured knee: the shape, the device, the rows and median times, the knee."""

    shape: ExpertShape
    device: str
    rows: tuple[int, ...]
    milliseconds: tuple[float, ...]
    tolerance: float
    knee_rows: int

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self.shape), "device": self.device, "rows": list(self.rows),
                "milliseconds": list(self.milliseconds), "tolerance": self.tolerance,
                "knee_rows": self.knee_rows}


def dtype_name(dtype: torch.dtype) -> str:
    """The name a calibration files a dtype under ("bfloat16", ...)."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"expert weights in {dtype} cannot be calibrated; use one of {', '.join(DTYPES)}")
    return name


def device_name(device: Union[str, torch.device]) -> str:
    """The name a calibration is filed under: the GPU's model, or "cpu"."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def row_counts(max_rows: int) -> list[int]:
    """1, 2, 4, ... up to max_rows, with the midpoints from 8 on (finer where knees lie)."""
    rows, power = [], 1
    while power <= max_rows:
        rows.append(power)
        if power >= 8 and power + power // 2 <= max_rows:
            rows.append(power + power // 2)
        power *= 2
    return rows


def find_knee(rows: Sequence[int], milliseconds: Sequence[float], tolerance: float) -> int:
    """The largest row count whose time is within `tolerance` of the fewest rows' time."""
    if len(rows) != len(milliseconds) or not rows:
        raise ValueError("rows and milliseconds must be non-empty and of one length")
    floor = milliseconds[0]
    return max(r for r, ms in zip(rows, milliseconds) if ms <= floor * (1 + tolerance))


def _expert_step(shape: ExpertShape, device: torch.device):
    """A function running the rank's m experts on `rows` rows each (weights made once)."""
    dtype = DTYPES[shape.dtype]
    generator = torch.Generator(device="cpu").manual_seed(0)
    fc1_out = 2 * shape.ffn if shape.gated else shape.ffn
    weights = [(torch.randn(fc1_out, shape.hidden, generator=generator).to(device, dtype) * 0.02,
                torch.randn(shape.hidden, shape.ffn, generator=generator).to(device, dtype) * 0.02)
               for _ in range(shape.experts_per_rank)]
    activation = torch.nn.functional.silu if shape.gated else torch.nn.functional.gelu

    def step(tokens: torch.Tensor) -> torch.Tensor:
        outputs = []
        for fc1, fc2 in weights:
            hidden = torch.nn.functional.linear(tokens, fc1)
            if shape.gated:
                gate, up = hidden.chunk(2, dim=-1)
                hidden = activation(gate) * up
            else:
                hidden = activation(hidden)
            outputs.append(torch.nn.functional.linear(hidden, fc2))
        return torch.cat(outputs)

    return step


def measure(
    shape: ExpertShape,
    device: Union[str, torch.device] = "cuda",
    max_rows: int = 1024,
    rounds: int = 5,
    tolerance: float = 0.1,
    min_run_time: float = 0.05,
) -> Calibration:
    """Time the experts at each row count (torch.utils.benchmark, `rounds` interleaved rounds,
    median per row count) and find the knee."""
    from torch.utils import benchmark

    if max_rows < 1 or rounds < 1 or not tolerance > 0:
        raise ValueError(f"need max_rows >= 1, rounds >= 1, tolerance > 0; got {max_rows}, {rounds}, {tolerance}")
    device = torch.device(device)
    step = _expert_step(shape, device)
    rows = row_counts(max_rows)
    inputs = {r: torch.randn(r, shape.hidden, device=device).to(DTYPES[shape.dtype]) for r in rows}
    samples: dict[int, list[float]] = {r: [] for r in rows}
    with torch.no_grad():
        for round_index in range(rounds):
            order = rows[round_index % len(rows):] + rows[: round_index % len(rows)]  # rotate
            for r in order:
                timer = benchmark.Timer("step(tokens)", globals={"step": step, "tokens": inputs[r]})
                samples[r].append(timer.blocked_autorange(min_run_time=min_run_time).median * 1e3)
    milliseconds = tuple(float(torch.tensor(samples[r]).median()) for r in rows)
    return Calibration(shape, device_name(device), tuple(rows), milliseconds, tolerance,
                       find_knee(rows, milliseconds, tolerance))


# ------------------------------------------------------------------------------------ the file


def default_path() -> Path:
    """$CAPAWARE_CALIBRATION, else ~/.cache/capaware_megatron/calibration.json."""
    return Path(os.environ.get(DEFAULT_PATH_ENV) or DEFAULT_PATH).expanduser()


def load(path: Union[str, os.PathLike], setting: str = "min_capacity") -> list[dict[str, Any]]:
    """The entries of a calibration file; errors name `setting` and what is wrong."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"{setting}: no calibration file at {str(path)!r}; write one with "
            "`python -m capaware_megatron.calibrate --out PATH ...`")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{setting}: calibration file {str(path)!r} is not valid JSON: {err}") from err
    entries = document.get("entries") if isinstance(document, dict) else None
    if not isinstance(document, dict) or document.get("format") != FORMAT or not isinstance(entries, list):
        raise ValueError(f'{setting}: {str(path)!r} is not a calibration file (needs "format": '
                         f'"{FORMAT}" and a list of "entries")')
    for index, entry in enumerate(entries):
        knee = entry.get("knee_rows") if isinstance(entry, dict) else None
        if isinstance(knee, bool) or not isinstance(knee, int) or knee < 1:
            raise ValueError(f"{setting}: entry {index} of {str(path)!r} has no knee_rows (an int >= 1)")
    return entries


def save(calibration: Calibration, path: Union[str, os.PathLike]) -> Path:
    """Add (or replace: same shape and device) the calibration's entry in the file at `path`."""
    path = Path(path).expanduser()
    entries = load(path) if path.exists() else []
    entry = calibration.to_json()
    key = _key(entry)
    entries = [e for e in entries if _key(e) != key] + [entry]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"format": FORMAT, "entries": entries}, indent=1) + "\n", encoding="utf-8")
    return path


def _key(entry: dict[str, Any]) -> tuple:
    return tuple(entry.get(name) for name in ("hidden", "ffn", "dtype", "experts_per_rank", "gated", "device"))


def knee_for(shape: ExpertShape, device: str, path: Union[str, os.PathLike], setting: str = "min_capacity") -> int:
    """The knee measured for this shape on this device in the file at `path`."""
    wanted = _key({**asdict(shape), "device": device})
    for entry in load(path, setting):
        if _key(entry) == wanted:
            return entry["knee_rows"]
    raise LookupError(
        f"{setting}: {str(Path(path).expanduser())!r} has no calibration for {shape} on {device!r}; "
        f"run `python -m capaware_megatron.calibrate --hidden {shape.hidden} --ffn {shape.ffn} "
        f"--dtype {shape.dtype} --experts-per-rank {shape.experts_per_rank}"
        f"{' --gated' if shape.gated else ''} --out {Path(path).expanduser()}` on that device")


def resolve_min_capacity(cfg: CapacityConfig, shape: ExpertShape, device: str) -> CapacityConfig:
    """cfg with its floor a number: min_capacity "auto" (the default file) or a calibration
    file's path becomes the knee measured for this layer's experts on this device."""
    spec = cfg.min_capacity
    if isinstance(spec, int):
        return cfg
    path = default_path() if spec == "auto" else Path(spec)
    return replace(cfg, min_capacity=knee_for(shape, device, path))


def main(argv: Optional[list[str]] = None) -> Calibration:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, required=True, help="H, the model's hidden size")
    parser.add_argument("--ffn", type=int, required=True, help="F, one expert's FFN size")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    parser.add_argument("--experts-per-rank", type=int, default=1, help="m, the experts one EP rank hosts")
    parser.add_argument("--gated", action="store_true", help="fc1 is a gated linear unit (SwiGLU: Mixtral, Qwen3, DeepSeek)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-rows", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tolerance", type=float, default=0.1,
                        help="a row count is below the knee while its time is within this of the fewest rows' (0.1: 10%%)")
    parser.add_argument("--out", default=None, help=f"the file to add the entry to (default ${DEFAULT_PATH_ENV}, else {DEFAULT_PATH})")
    args = parser.parse_args(argv)
    shape = ExpertShape(args.hidden, args.ffn, args.dtype, args.experts_per_rank, args.gated)
    calibration = measure(shape, args.device, args.max_rows, args.rounds, args.tolerance)
    path = save(calibration, args.out or default_path())
    print(f"{'rows':>6}  {'ms':>9}  (m={shape.experts_per_rank} experts, H={shape.hidden}, F={shape.ffn}, "
          f"{shape.dtype}{', gated' if shape.gated else ''}, {calibration.device})")
    for rows, ms in zip(calibration.rows, calibration.milliseconds):
        mark = "  <- knee" if rows == calibration.knee_rows else ""
        print(f"{rows:>6}  {ms:>9.4f}{mark}")
    print(f"knee: {calibration.knee_rows} rows (within {math.floor(args.tolerance * 100)}% of 1 row's time); "
          f"written to {path}")
    return calibration


if __name__ == "__main__":
    main()

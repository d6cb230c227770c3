"""Megatron-LM argument path: megatron.training.arguments.parse_args on CPU, and the run wrapper."""

import argparse
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("megatron.core")

from capaware_megatron import CapacityConfig  # noqa: E402
from capaware_megatron.megatron import (  # noqa: E402
    add_capaware_args,
    capacity_config_from_args,
    validate_capaware_args,
)
from capaware_megatron.megatron._compat import patch_typing_override  # noqa: E402

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "fake_pretrain.py")


def _parse(argv, monkeypatch):
    patch_typing_override()
    from megatron.training.arguments import parse_args

    monkeypatch.setattr(sys, "argv", ["pretrain_gpt.py", *argv])
    return parse_args(extra_args_provider=add_capaware_args, ignore_unknown_args=False)


@pytest.mark.parametrize("flag", ["--moe-token-dispatcher-type", "--moe-token-dispatcher"])
def test_megatron_parser_accepts_capaware(flag, monkeypatch):
    args = _parse([flag, "capaware", "--capaware-capacity-factor", "1.5", "--capaware-policy",
                   "reroute", "--capaware-scope", "global", "--capaware-min-capacity", "4",
                   "--capaware-renormalize"], monkeypatch)
    assert args.moe_token_dispatcher_type == "capaware"
    assert validate_capaware_args(args) == CapacityConfig(
        1.5, policy="reroute", scope="global", min_capacity=4, renormalize=True
    )


def test_stock_dispatchers_still_parse(monkeypatch):
    args = _parse(["--moe-token-dispatcher-type", "alltoall"], monkeypatch)
    assert args.moe_token_dispatcher_type == "alltoall"
    assert validate_capaware_args(args) is None


def test_bad_values_are_rejected(monkeypatch, capsys):
    with pytest.raises(SystemExit):
        _parse(["--moe-token-dispatcher", "capaware", "--capaware-policy", "dropp"], monkeypatch)
    assert "--capaware-policy" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parse(["--moe-token-dispatcher", "capawre"], monkeypatch)
    args = _parse(["--moe-token-dispatcher", "capaware", "--capaware-capacity-factor", "-1"], monkeypatch)
    with pytest.raises(ValueError, match="capacity_factor must be > 0"):
        validate_capaware_args(args)


def test_conflicting_flags(monkeypatch):
    args = _parse(["--moe-token-dispatcher", "capaware", "--moe-expert-capacity-factor", "1.0",
                   "--capaware-capacity-factor", "1.5"], monkeypatch)
    with pytest.raises(ValueError, match="--moe-expert-capacity-factor"):
        validate_capaware_args(args)
    args = _parse(["--moe-token-dispatcher-type", "alltoall", "--capaware-capacity-factor", "1.5"], monkeypatch)
    with pytest.raises(ValueError, match="needs --moe-token-dispatcher-type capaware"):
        validate_capaware_args(args)
    args = _parse(["--moe-token-dispatcher", "capaware", "--capaware-policy", "none",
                   "--capaware-capacity-factor", "1.5"], monkeypatch)
    with pytest.raises(ValueError, match="policy='none'"):
        capacity_config_from_args(args)
    args = _parse(["--moe-token-dispatcher", "capaware", "--capaware-policy", "reroute"], monkeypatch)
    with pytest.raises(ValueError, match="policy='reroute' needs a capacity_factor"):
        capacity_config_from_args(args)
    args = _parse(["--moe-token-dispatcher", "capaware"], monkeypatch)
    assert capacity_config_from_args(args).is_dropless
    # Megatron's inference-optimized layers swap the dispatcher out at every forward.
    args = _parse(["--moe-token-dispatcher", "capaware", "--transformer-impl", "inference_optimized",
                   "--capaware-capacity-factor", "1.0"], monkeypatch)
    with pytest.raises(ValueError, match="inference_optimized.*capaware supports transformer_impl 'local'"):
        validate_capaware_args(args)


def test_parser_without_megatron_arguments():
    parser = add_capaware_args(argparse.ArgumentParser(allow_abbrev=False))
    args = parser.parse_args(["--moe-token-dispatcher", "capaware", "--capaware-capacity-factor", "none"])
    assert args.moe_token_dispatcher_type == "capaware" and args.capaware_capacity_factor is None


def _run_wrapper(*argv, target=SCRIPT, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "capaware_megatron.megatron.run", *([target] if target else []), *argv],
        capture_output=True, text=True, timeout=300, cwd=cwd,
    )


def test_run_wrapper_on_an_unmodified_script():
    out = _run_wrapper("--moe-token-dispatcher", "capaware", "--capaware-capacity-factor", "2.0",
                       "--capaware-priority", "random", "--script-own-flag", "3")
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["dispatcher"] == "capaware"
    assert result["script_own_flag"] == 3  # the script's own provider still runs
    assert result["capacity"]["capacity_factor"] == 2.0
    assert result["capacity"]["priority"] == "random"
    assert result["neighbour"] == "found" and result["name"] == "__main__"


def test_run_wrapper_runs_a_module_like_python_m(tmp_path):
    """`-m MODULE` (Megatron's inference server is started that way), from the current folder."""
    out = _run_wrapper("-m", "fake_pretrain", "--moe-token-dispatcher", "capaware",
                       "--capaware-capacity-factor", "1.5", target=None, cwd=os.path.dirname(SCRIPT))
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["capacity"]["capacity_factor"] == 1.5 and result["name"] == "__main__"
    missing = _run_wrapper(target=str(tmp_path / "no_such_script.py"))
    assert missing.returncode != 0 and "no such script" in missing.stderr


def test_run_wrapper_reports_conflicts():
    out = _run_wrapper("--moe-token-dispatcher-type", "capaware", "--moe-expert-capacity-factor", "1.0")
    assert out.returncode != 0
    assert "--capaware-capacity-factor instead" in out.stderr


def test_token_bound_from_the_micro_batch(monkeypatch):
    base = ["--moe-token-dispatcher", "capaware", "--capaware-capacity-factor", "1.0",
            "--capaware-scope", "global", "--micro-batch-size", "4", "--seq-length", "1000"]
    args = _parse([*base, "--capaware-max-tokens-per-rank", "auto"], monkeypatch)
    assert capacity_config_from_args(args).max_tokens_per_rank == 4000
    # Sequence parallelism splits a micro-batch's tokens over the TP ranks, context parallelism too.
    args.sequence_parallel, args.tensor_model_parallel_size, args.context_parallel_size = True, 2, 3
    assert capacity_config_from_args(args).max_tokens_per_rank == 667
    args = _parse([*base, "--capaware-max-tokens-per-rank", "512"], monkeypatch)
    assert capacity_config_from_args(args).max_tokens_per_rank == 512
    args = _parse(base, monkeypatch)
    assert capacity_config_from_args(args).max_tokens_per_rank is None
    args = _parse(["--moe-token-dispatcher", "capaware", "--capaware-capacity-factor", "1.0",
                   "--capaware-max-tokens-per-rank", "auto"], monkeypatch)
    with pytest.raises(ValueError, match="auto needs --micro-batch-size and --seq-length"):
        capacity_config_from_args(args)
    args = _parse([*base, "--capaware-max-tokens-per-rank", "0"], monkeypatch)
    with pytest.raises(ValueError, match="max_tokens_per_rank must be >= 1"):
        capacity_config_from_args(args)


def test_token_bound_flag_refuses_words(monkeypatch, capsys):
    with pytest.raises(SystemExit):
        _parse(["--moe-token-dispatcher", "capaware", "--capaware-max-tokens-per-rank", "many"], monkeypatch)
    assert "--capaware-max-tokens-per-rank" in capsys.readouterr().err


def test_decode_factor_and_calibrated_floor_flags(monkeypatch, tmp_path):
    from capaware_megatron.calibrate import Calibration, ExpertShape, save

    path = save(Calibration(ExpertShape(16, 24, "float32", 4), "cpu", (1, 2), (1.0, 1.0), 0.1, 2),
                tmp_path / "knees.json")
    args = _parse(["--moe-token-dispatcher", "capaware", "--capaware-decode-capacity-factor", "1.5",
                   "--capaware-min-capacity", str(path)], monkeypatch)
    assert capacity_config_from_args(args) == CapacityConfig(decode_capacity_factor=1.5, min_capacity=str(path))
    args = _parse(["--moe-token-dispatcher", "capaware", "--capaware-capacity-factor", "1.0",
                   "--capaware-min-capacity", "auto"], monkeypatch)
    assert capacity_config_from_args(args).min_capacity == "auto"
    args = _parse(["--moe-token-dispatcher", "capaware", "--capaware-capacity-factor", "1.0",
                   "--capaware-min-capacity", "12"], monkeypatch)
    assert capacity_config_from_args(args).min_capacity == 12
    args = _parse(["--moe-token-dispatcher", "capaware", "--capaware-capacity-factor", "1.0",
                   "--capaware-min-capacity", str(tmp_path / "none.json")], monkeypatch)
    with pytest.raises(FileNotFoundError, match="min_capacity: no calibration file"):
        capacity_config_from_args(args)
    args = _parse(["--moe-token-dispatcher", "capaware", "--capaware-decode-capacity-factor", "0"], monkeypatch)
    with pytest.raises(ValueError, match="decode_capacity_factor must be > 0"):
        capacity_config_from_args(args)
    args = _parse(["--moe-token-dispatcher-type", "alltoall", "--capaware-decode-capacity-factor", "2"], monkeypatch)
    with pytest.raises(ValueError, match="--capaware-decode-capacity-factor needs --moe-token-dispatcher-type capaware"):
        validate_capaware_args(args)

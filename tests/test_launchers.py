"""The cluster launchers compose the command they promise (torchrun stood in for by a recorder)."""

import os
import stat
import subprocess

LAUNCH = os.path.join(os.path.dirname(__file__), "..", "launch")


def _launch(script, tmp_path, **env):
    recorder = tmp_path / "bin" / "torchrun"
    recorder.parent.mkdir()
    recorder.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$PWD" "$@"\n')
    recorder.chmod(recorder.stat().st_mode | stat.S_IEXEC)
    megatron_lm = tmp_path / "Megatron-LM"
    megatron_lm.mkdir()
    out = subprocess.run(
        ["bash", os.path.join(LAUNCH, script), "--extra-flag"], capture_output=True, text=True, timeout=60,
        env=dict(os.environ, PATH=f"{recorder.parent}:{os.environ['PATH']}", MEGATRON_LM=str(megatron_lm),
                 CHECKPOINT="/ckpt", **env),
    )
    assert out.returncode == 0, out.stderr
    cwd, *argv = out.stdout.splitlines()
    return cwd, argv, megatron_lm


def test_text_generation_server_launcher(tmp_path):
    cwd, argv, megatron_lm = _launch("megatron_text_generation_server.sh", tmp_path)
    assert cwd == str(megatron_lm)  # -m MODULE resolves from the checkout, as python -m does
    start = argv.index("-m")
    assert argv[start:start + 4] == ["-m", "capaware_megatron.megatron.run", "-m",
                                     "examples.inference.launch_inference_server"]
    for flag in ("--moe-pad-experts-for-cuda-graph-inference", "--moe-token-dispatcher",
                 "--capaware-capacity-factor", "--nproc-per-node"):
        assert flag in argv, flag
    assert argv[argv.index("--transformer-impl") + 1] == "transformer_engine"
    assert argv[-1] == "--extra-flag" and argv[argv.index("--load") + 1] == "/ckpt"


def test_pretrain_launcher(tmp_path):
    _, argv, megatron_lm = _launch("megatron_gpt_moe.sh", tmp_path, DATA_PATH="/data")
    start = argv.index("-m")
    assert argv[start:start + 3] == ["-m", "capaware_megatron.megatron.run", f"{megatron_lm}/pretrain_gpt.py"]
    assert "--skip-train" in argv and "--capaware-capacity-factor" in argv and argv[-1] == "--extra-flag"


def test_launchers_name_what_they_need():
    out = subprocess.run(["bash", os.path.join(LAUNCH, "megatron_text_generation_server.sh")],
                         capture_output=True, text=True, timeout=60,
                         env={k: v for k, v in os.environ.items() if k not in ("MEGATRON_LM", "CHECKPOINT")})
    assert out.returncode != 0 and "MEGATRON_LM" in out.stderr

"""``python -m onnx_udfc`` as a real process: the module entry point, the exit status it hands
to the shell, and the progress bar on a terminal. Everything else about the command line is
tested in-process (test_cli.py)."""

from __future__ import annotations

import os
import pty
import subprocess
import sys

import onnx


def onnx_udfc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onnx_udfc", *args], capture_output=True,
                          text=True, timeout=300)


def test_version_from_the_module_entry():
    r = onnx_udfc("--version")
    assert r.returncode == 0 and r.stdout.startswith("onnx-udfc ")


def test_compress_exits_zero_and_writes_a_valid_model(tmp_path, digits_model):
    out = tmp_path / "o.onnx"
    r = onnx_udfc("compress", str(digits_model), "-o", str(out), "--prune", "0.3", "--no-verify")
    assert r.returncode == 0, r.stderr
    assert "params" in r.stdout and "[#" not in r.stderr  # a pipe gets no progress bar
    onnx.checker.check_model(str(out), full_check=True)


def test_error_exits_two_with_one_line(tmp_path):
    out = tmp_path / "o.onnx"
    r = onnx_udfc("compress", str(tmp_path / "missing.onnx"), "-o", str(out))
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnx-udfc: error:") and \
        "no such file" in lines[0]
    assert not out.exists()


def test_progress_bar_on_a_tty(tmp_path, digits_model):
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "onnx_udfc", "compress", str(digits_model),
                             "-o", str(tmp_path / "o.onnx"), "--prune", "0.3", "--no-verify"],
                            stdout=subprocess.DEVNULL, stderr=follower)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 4096)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=120) == 0
    os.close(leader)
    assert b"[#" in b"".join(chunks)

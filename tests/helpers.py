"""Shared test helpers: the repository's scripts run as a user runs them (a subprocess, or torchrun with
nproc > 1), or their main() in-process with sys.argv set, stdout / stderr captured and run_main's exit status."""
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from avnano.errors import run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(script, *args, nproc=1, env=None, timeout=300, status=0):
    """python SCRIPT ARGS in the repository root (torchrun --nproc_per_node NPROC when nproc > 1), one intra-op
    thread per process, killed after `timeout` s; asserts the exit status and returns the CompletedProcess."""
    cmd = [sys.executable, script]
    if nproc > 1:  # a free port each time: a fixed one can still be held by the previous run's store
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port), script]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
    out = subprocess.run(cmd + [str(a) for a in args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=timeout)
    assert out.returncode == status, f"exit status {out.returncode}, expected {status}\n" + out.stdout[-3000:] + out.stderr[-3000:]
    return out


def run_in_process(monkeypatch, capsys, main, *argv, status=None):
    """main() under run_main with sys.argv = [script, *argv] -> (stdout, stderr lines). status: the SystemExit code
    expected (2: bad input), None: main must return normally. Global switches main() sets (TF32) are restored after."""
    monkeypatch.setattr(sys, "argv", ["script.py", *map(str, argv)])
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", torch.backends.cuda.matmul.allow_tf32)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", torch.backends.cudnn.allow_tf32)
    capsys.readouterr()  # drop whatever the test printed before
    if status is None:
        run_main(main)
    else:
        with pytest.raises(SystemExit) as e:
            run_main(main)
        assert e.value.code == status
    out, err = capsys.readouterr()
    return out, err.splitlines()


def one_error(lines):
    """stderr of a refused input: exactly one line, `error: <message>` (no traceback, nothing else) -> that line."""
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def assert_prints_caption(out, text):
    """sample.py's stdout is exactly the caption's line (for an empty caption: its one-line note, nothing else)."""
    if text.strip():
        assert out == text + "\n", (out, text)
    else:
        assert out.startswith("(empty caption") and out.count("\n") == 1, out


def best_time(fn, repeats):
    """(fastest of `repeats` calls of fn in seconds, the last call's result): the benchmarks' timer."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out

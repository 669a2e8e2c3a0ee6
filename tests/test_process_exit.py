"""`vpcce.launch.process_exit.exit_process`: the launchers' exit keeps the code and the output."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import atexit, sys
from vpcce.launch.process_exit import exit_process

atexit.register(lambda: print("atexit ran"))
print("report", end="")  # no newline: still in the buffer
sys.stderr.write("log")
exit_process({code})
print("unreachable")
"""


@pytest.mark.parametrize("code, want", [(3, 3), (0, 0), (None, 0)])
def test_exit_process_flushes_and_keeps_the_code(code, want):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("PYTHONUNBUFFERED", None)  # buffered, as under torchrun: the flush is under test
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(code=code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == want, proc.stderr
    # no interpreter teardown: atexit handlers do not run
    assert (proc.stdout, proc.stderr) == ("report", "log")

"""`vpcce.launch.memory.exit_process`: how a process that metered memory around collectives ends.

Each case runs in a fresh interpreter (``saw_collective`` is per process and sticky).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import sys
import torch
import torch.distributed as dist
from vpcce.launch import memory

dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
x = torch.ones(4)
with memory.MemoryMeter(torch.device("cpu")) as meter:
    y = x * 2
    if {collective}:
        dist.all_reduce(y)
print("peak", meter.step_peak, "saw", memory.saw_collective(), end="")  # no newline: unflushed
sys.stderr.write("left")
dist.barrier()
dist.destroy_process_group()
memory.exit_process({code})
print("unreachable")
"""


def _run(collective: bool, code: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("PYTHONUNBUFFERED", None)  # buffered, as under torchrun: the flush is under test
    source = textwrap.dedent(SCRIPT.format(collective=collective, code=code))
    return subprocess.run(
        [sys.executable, "-c", source], env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("collective, code", [(True, 3), (True, 0), (False, 2)])
def test_exit_process_keeps_the_code_and_the_output(collective, code):
    """With a metered collective it leaves without finalization; output is flushed either way."""
    proc = _run(collective, code)
    assert proc.returncode == code, proc.stderr
    assert proc.stdout == f"peak 16 saw {collective}", proc.stdout
    assert proc.stderr.endswith("left"), proc.stderr

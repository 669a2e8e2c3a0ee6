"""How the launchers that ran a process group leave: ``os._exit`` after flushing stdout/stderr.

A process that ran a gloo group under torchrun can abort after its last line of Python, while the
interpreter and then C++ static objects are torn down: "terminate called without an active
exception", SIGABRT, and torchrun reports the job failed. The bench test's ranks did so in 2 of 2
CI runs (and in 2 of ~10 before). A 2-rank script that inits gloo, all_reduces, barriers and
destroys the group (torch 2.13, CPU) aborted in 5 of its first 95 runs and in none of 330 run
later (the conditions that set the rate are not known); at the abort only the main thread is
left and it runs no Python (faulthandler): a static destructor met a joinable ``std::thread``.
Separately, a `TorchDispatchMode` that sees a c10d op (the CPU memory meter,
`vpcce.launch.memory`) keeps the group alive past ``destroy_process_group`` (its refcount grows
by 10 for good; its gloo threads keep running into that teardown).

``os._exit`` skips that teardown. It also skips ``atexit`` handlers and buffered writes, so the
launchers close their files before they return and this flushes the standard streams.
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn


def exit_process(code: int | None = 0) -> NoReturn:
    """Flush stdout and stderr, then leave with ``code`` (None: 0) without interpreter teardown."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)

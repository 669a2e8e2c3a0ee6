"""Run a function on W freshly spawned ranks of a torch.distributed group (CPU, gloo by default).

``run_ranks(fn, world_size, *args, **kwargs)`` spawns W processes, joins them in a process group
through a ``file://`` rendezvous in a fresh temporary directory (no fixed ports, so pytest-xdist
workers never collide), calls ``fn(rank, world_size, *args, **kwargs)`` on each and returns the
per-rank results in rank order.

- ``fn`` must be a module-level function: the spawn start method pickles it by qualified name and
  each child imports its module again (``sys.path`` travels with the spawn, so test modules that
  pytest imported through its rootdir are importable in the children).
- Results travel back as ``torch.save`` bytes over one pipe per rank, not through
  torch.multiprocessing's shared-memory tensor sharing, which needs the sender alive while the
  parent unpickles (the children exit right after sending).
- Every rank joins the group (a barrier) before any calls ``fn``.
- A rank that raises: its traceback text is sent back and `RankError` is raised in the parent,
  chained from the original exception when that one pickles. The other ranks, usually stuck in a
  collective with the dead rank, get a short grace period and are then killed.
- A rank that neither returns nor fails by ``timeout`` seconds (spawn and imports included): every
  child gets SIGUSR1 (a faulthandler stack dump on its stderr), is killed, and `TimeoutError`
  names the ranks that did not finish.

Each spawn costs a few seconds of imports per rank: run many cases inside one ``fn`` call.
"""

from __future__ import annotations

import datetime
import faulthandler
import io
import multiprocessing.connection
import os
import pickle
import signal
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# After the first failing rank reports, how long the others may take to report their own outcome
# before they are killed (they are usually blocked in a collective with the failed rank).
FAILURE_GRACE_S = 5.0
# After SIGUSR1, how long a hung child gets to write its stack dump before it is killed.
DUMP_GRACE_S = 1.0


class RankError(RuntimeError):
    """A rank raised; ``rank``, ``traceback`` (text) and ``original`` (the exception, or None)."""

    def __init__(self, message: str, rank: int, tb: str, original: BaseException | None):
        super().__init__(message)
        self.rank = rank
        self.traceback = tb
        self.original = original


def _child(rank, world_size, init_method, backend, timeout, conn, fn, args, kwargs):
    """One spawned rank: set up, run ``fn``, send ``("ok", result)`` or ``("error", ...)``."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    if hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        dist.init_process_group(
            backend,
            init_method=init_method,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout),
        )
        # every rank has joined before any runs fn: gloo's init returns on a rank once its own
        # side of the full mesh is up, and a rank that then returned (and exited) at once closed
        # its sockets under a peer still connecting, which reported that instead of its outcome
        dist.barrier()
        try:
            message = ("ok", fn(rank, world_size, *args, **kwargs))
        finally:
            dist.destroy_process_group()
    except BaseException as exc:  # noqa: BLE001 - everything a rank raises goes to the parent
        try:
            original = pickle.dumps(exc)
        except Exception:  # noqa: BLE001 - an unpicklable exception still reports its traceback
            original = None
        message = ("error", traceback.format_exc(), original)
    buf = io.BytesIO()
    try:
        torch.save(message, buf)
    except Exception:  # noqa: BLE001 - an unpicklable result is this rank's failure
        buf = io.BytesIO()
        torch.save(("error", traceback.format_exc(), None), buf)
    conn.send_bytes(buf.getvalue())
    conn.close()


def _decode(raw: bytes):
    return torch.load(io.BytesIO(raw), weights_only=False)


def _stop(procs, dump: bool) -> None:
    alive = [p for p in procs if p.is_alive()]
    if dump and alive and hasattr(signal, "SIGUSR1"):
        for p in alive:
            os.kill(p.pid, signal.SIGUSR1)
        time.sleep(DUMP_GRACE_S)
    for p in alive:
        p.kill()
    for p in procs:
        p.join(timeout=10)


def run_ranks(
    fn, world_size: int, *args, timeout: float = 120, backend: str = "gloo", **kwargs
) -> list:
    """``[fn(r, world_size, *args, **kwargs) for r in range(world_size)]``, each on its own rank."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    ctx = mp.get_context("spawn")
    deadline = time.monotonic() + timeout
    with tempfile.TemporaryDirectory(prefix="vpcce-ranks-") as tmp:
        init_method = "file://" + os.path.join(tmp, "rendezvous")
        procs, conns = [], []
        for rank in range(world_size):
            recv, send = ctx.Pipe(duplex=False)
            p = ctx.Process(
                target=_child,
                args=(rank, world_size, init_method, backend, timeout, send, fn, args, kwargs),
                daemon=True,
            )
            p.start()
            send.close()  # the child holds the only write end: its exit closes the pipe
            procs.append(p)
            conns.append(recv)

        outcomes: dict[int, tuple] = {}  # rank -> decoded message
        first_error: int | None = None
        try:
            while len(outcomes) < world_size:
                now = time.monotonic()
                if first_error is not None:
                    limit = min(deadline, outcomes[first_error][-1] + FAILURE_GRACE_S)
                else:
                    limit = deadline
                if now >= limit:
                    break
                pending = {conns[r]: r for r in range(world_size) if r not in outcomes}
                for conn in multiprocessing.connection.wait(list(pending), timeout=limit - now):
                    rank = pending[conn]
                    try:
                        message = _decode(conn.recv_bytes())
                    except EOFError:
                        procs[rank].join(timeout=10)
                        message = (
                            "error",
                            f"rank {rank} exited with code {procs[rank].exitcode} "
                            "without sending a result",
                            None,
                        )
                    outcomes[rank] = (*message, time.monotonic())
                    if message[0] == "error" and first_error is None:
                        first_error = rank
        finally:
            unfinished = [r for r in range(world_size) if r not in outcomes]
            _stop(procs, dump=bool(unfinished) and first_error is None)
            for conn in conns:
                conn.close()

    if first_error is not None:
        _, tb, original, _ = outcomes[first_error]
        others = sorted(r for r, m in outcomes.items() if m[0] == "error" and r != first_error)
        note = f"; ranks {others} also failed" if others else ""
        note += f"; ranks {unfinished} did not finish and were killed" if unfinished else ""
        try:
            exc = pickle.loads(original) if original is not None else None
        except Exception:  # noqa: BLE001 - e.g. an exception class whose __init__ needs arguments
            exc = None
        raise RankError(
            f"rank {first_error} of {world_size} failed{note}. Its traceback:\n{tb}",
            first_error,
            tb,
            exc,
        ) from exc
    if unfinished:
        raise TimeoutError(
            f"ranks {unfinished} of {world_size} did not finish within {timeout} s "
            "(killed; their stacks were dumped to stderr)"
        )
    return [outcomes[r][1] for r in range(world_size)]


def run_torchrun(module: str, *args: str, nproc: int = 2, timeout: float = 180):
    """``torchrun --standalone --nproc_per_node nproc -m module *args`` from the repo root.

    torchrun picks a free port itself (safe under pytest-xdist); one thread per rank.
    """
    import subprocess
    from pathlib import Path

    from vpcce.launch.tp_round import torchrun_command

    root = Path(__file__).resolve().parents[1]
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
    )
    cmd = torchrun_command(module, list(args), nproc)
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)

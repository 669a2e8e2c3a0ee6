"""Benchmark of linear cross-entropy implementations: time, op memory and error vs an fp64 truth.

    python -m vpcce.launch.bench --config configs/bench/gemma2_h100.yaml [key=value ...]
    torchrun --nproc_per_node 8 -m vpcce.launch.bench --config configs/bench/llama3_h100.yaml

For each data set (flat random; LM-like peaked data at several mean entropies, `vpcce.launch.data`)
and each N of the sweep it measures every method of `vpcce.launch.methods` that can run here, next
to the floor row: the GEMM ``e @ c.T`` of the same shape (fw 1x, bw 3x, fw+bw 4x that time: the
logits, then recomputed logits and the two gradient GEMMs of an exact backward without stored
logits). Output: progress on stderr; ``<out>/<name>.json`` (every number, the config and the
environment), ``<out>/<name>.md`` and ``<out>/<name>.png`` (fw+bw time and op memory vs N, one
line per method); the markdown table is printed last on stdout. JSON and markdown are rewritten
after every shape (``"complete": false`` until the end), so a run stopped part-way leaves what
it measured. Config keys: `BenchConfig`;
``key=value`` arguments override them (values parsed as YAML: ``n=[1024,8192] out=/tmp/b``).

Definitions:

- kinds: ``fw`` = the forward with inputs requiring grad (as in training: what backward needs is
  saved); ``bw`` = ``torch.autograd.grad`` of that loss w.r.t. ``(e, c)``, the forward run untimed
  before each repetition; ``fw+bw`` = both.
- time: median over ``rep`` repetitions after ``warmup`` untimed ones. CUDA: a pair of CUDA events
  around each repetition (a fixed repetition count rather than ``triton.testing.do_bench``'s
  time-based one, so every rank of a torchrun group runs the same number of collectives).
  CPU: ``time.perf_counter``. The floor is timed before the methods and again after them
  (``gemm_ms_after``, printed as the floor's drift; the ratios use the first): under load the
  GPU's clocks follow its power state, which moves a long run's times by several percent.
- op memory: peak memory during the op minus what was allocated before it (inputs excluded), minus
  the gradients the op returns (bw, fw+bw) — the definition of `kernel_check` and of the peer
  table in shared/README.md. CUDA: ``torch.cuda.max_memory_allocated``; CPU: the live bytes of
  tensor storages created inside the op (`vpcce.launch.memory.MemoryMeter`). A backward that frees
  its saved tensors before writing the gradients can come out below 0: reported as 0.
- error (``error: true``): ``|loss - t| / |t|`` and ``||x - t|| / ||t||`` for dE and dC against an
  fp64 truth computed from the same (rounded) inputs, token chunks of materialized fp64 logits.
- under torchrun (WORLD_SIZE > 1): the classifier is split by vocabulary
  (`VocabParallelOptions.from_vocab`); vpcce runs vocab-parallel, Megatron and apple on their
  rank's logits with the hidden gradient summed over ranks; methods that need the whole vocabulary
  are skipped. Times and memory are the maximum over ranks, dC errors use norms summed over ranks;
  the floor is each rank's shard GEMM. Rank 0 prints and writes. A method that fails on some ranks
  only (e.g. out of memory on one) can leave the others waiting in a collective.
- collectives (``comm: true``, under torchrun): one more fw+bw per method under torch.profiler;
  the time in collectives (NCCL kernels, or gloo's ranges on CPU; slowest rank) and the part
  other GPU work overlaps (least over ranks; not measured on CPU), `vpcce.launch.comm_profile`.
- vpcce on CPU: ``vpcce_impl: auto`` runs ``impl="torch"``; ``vpcce_impl: triton`` runs the Triton
  kernels in the interpreter, setting ``TRITON_INTERPRET=1`` at startup if needed (before any
  kernel module is imported). Interpreted kernels are seconds per call: tiny shapes only.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import gc
import importlib.metadata
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from vpcce.launch import methods as M
from vpcce.launch.bench_report import FLOOR, FLOOR_FACTOR, markdown, plot
from vpcce.launch.comm_profile import profile_comm
from vpcce.launch.config import read_config
from vpcce.launch.data import Batch, flat, lm_like
from vpcce.launch.memory import MemoryMeter
from vpcce.launch.process_exit import exit_process
from vpcce.parallel import VocabParallelOptions

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
KINDS = ("fw", "bw", "fw+bw")
TRUTH_CHUNK_BYTES = 1 << 30  # fp64 logits of one token chunk of the truth
MB = 2**20


@dataclass
class BenchConfig:
    name: str = ""  # defaults to the config file's stem
    device: str = "auto"  # "auto" (cuda if available) | "cuda" | "cpu"
    dtype: str = "bf16"  # of e and c: bf16 | fp16 | fp32
    n: list = field(default_factory=lambda: [8192])  # tokens, the sweep's x axis
    d: int = 2304
    v: int = 256000  # global vocabulary (split over ranks under torchrun)
    flat: bool = True  # the flat random data set (randn, near-uniform softmax)
    entropies: list = field(default_factory=lambda: [1.0, 5.0, 12.0])  # LM-like data sets (nats)
    sort_vocab: bool = False  # LM-like: vocabulary numbered by frequency
    seed: int = 0
    methods: list = field(default_factory=lambda: ["vpcce_exact", "vpcce", "eager", "compile"])
    kinds: list = field(default_factory=lambda: list(KINDS))
    warmup: int = 3  # untimed repetitions
    rep: int = 10  # timed repetitions (median)
    memory: bool = True
    error: bool = True
    floor: bool = True  # the GEMM floor row
    comm: bool = False  # under torchrun: time in collectives of one fw+bw, and how much is hidden
    vpcce_impl: str = "auto"  # "auto" (triton on CUDA, torch on CPU) | "triton" | "torch"
    plot_data: str | None = None  # data set of the PNG (when run); else the first peaked one
    out: str | None = None  # output folder; default out/bench/<name>

    def __post_init__(self):
        if isinstance(self.n, int):
            self.n = [self.n]
        if isinstance(self.entropies, (int, float)):
            self.entropies = [self.entropies]
        for key in ("flat", "sort_vocab", "memory", "error", "floor", "comm"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{key} must be true or false, got {getattr(self, key)!r}")
        for key in ("name", "out", "plot_data"):
            if getattr(self, key) is not None and not isinstance(getattr(self, key), str):
                raise ValueError(f"{key} must be a string, got {getattr(self, key)!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        _choice("device", self.device, ("auto", "cuda", "cpu"))
        _choice("dtype", self.dtype, tuple(DTYPES))
        _choice("vpcce_impl", self.vpcce_impl, ("auto", "triton", "torch"))
        if not self.n or any(not _positive_int(x) for x in self.n):
            raise ValueError(f"n must be a list of positive integers, got {self.n!r}")
        self.n = sorted(set(self.n))
        for key in ("d", "v", "rep"):
            if not _positive_int(getattr(self, key)):
                raise ValueError(f"{key} must be a positive integer, got {getattr(self, key)!r}")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"warmup must be an integer >= 0, got {self.warmup!r}")
        if any(
            isinstance(h, bool) or not isinstance(h, (int, float)) or h <= 0 for h in self.entropies
        ):
            raise ValueError(f"entropies must be positive numbers (nats), got {self.entropies!r}")
        self.entropies = [float(h) for h in self.entropies]
        if not self.flat and not self.entropies:
            raise ValueError("no data set: flat is false and entropies is empty")
        unknown = [m for m in self.methods if m not in M.METHODS]
        if not self.methods or unknown or len(set(self.methods)) != len(self.methods):
            raise ValueError(
                f"methods must be distinct names from {sorted(M.METHODS)}, got {self.methods!r}"
            )
        if not self.kinds or any(k not in KINDS for k in self.kinds):
            raise ValueError(
                f"kinds must be a non-empty list from {list(KINDS)}, got {self.kinds!r}"
            )
        self.kinds = [k for k in KINDS if k in self.kinds]

    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path("out") / "bench" / self.name


def _choice(key, value, allowed):
    if value not in allowed:
        raise ValueError(f"{key} must be one of {list(allowed)}, got {value!r}")


def _positive_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


def peaked_name(entropy: float) -> str:
    return f"peaked~{entropy:g}"


def load_config(path: str | Path | None, overrides=()) -> BenchConfig:
    """`BenchConfig` from a YAML mapping (or the defaults), then ``key=value`` overrides."""
    raw = read_config(path, overrides, [f.name for f in dataclasses.fields(BenchConfig)])
    cfg = BenchConfig(**raw)
    cfg.name = cfg.name or "bench"
    return cfg


# ---- process group, device, data ----


@dataclass
class Run:
    cfg: BenchConfig
    setting: M.Setting
    rank: int
    world: int
    owns_group: bool  # this process initialized torch.distributed (and destroys it at the end)

    @property
    def device(self) -> torch.device:
        return self.setting.device

    def log(self, text: str) -> None:
        if self.rank == 0:
            print(text, file=sys.stderr, flush=True)


def _start(cfg: BenchConfig) -> Run:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    want_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise ValueError("device='cuda' but CUDA is not available")
    device = torch.device("cuda" if want_cuda else "cpu")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    impl = cfg.vpcce_impl
    if impl == "auto":
        impl = "triton" if device.type == "cuda" else "torch"
    if impl == "triton" and device.type != "cuda":
        _use_triton_interpreter()

    owns_group = False
    backend = "nccl" if device.type == "cuda" else "gloo"
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend)
        owns_group = True
    elif not dist.is_initialized() and "megatron" in cfg.methods and _importable("megatron.core"):
        # Megatron's collectives need a process group even for one rank
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, rank=0, world_size=1)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        owns_group = True
    rank = dist.get_rank() if world > 1 else 0
    if world > 1:
        opts = VocabParallelOptions.from_vocab(cfg.v)
        start, stop = opts.start, opts.stop
    else:
        start, stop = 0, cfg.v
    setting = M.Setting(device, cfg.v, start, stop, rank, world, None, impl)
    return Run(cfg, setting, rank, world, owns_group)


def _use_triton_interpreter() -> None:
    """Triton decides interpreter or compiler when a kernel is decorated: before vpcce.kernels."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return
    if "vpcce.kernels" in sys.modules:
        raise ValueError(
            "vpcce_impl='triton' on CPU needs TRITON_INTERPRET=1 before vpcce's kernels are "
            "imported; set it in the environment"
        )
    os.environ["TRITON_INTERPRET"] = "1"


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def _data_sets(run: Run) -> list[tuple[str, object]]:
    """(name, make) of every data set, made at the largest N (smaller N use its first tokens)."""
    cfg, n, dtype, dev = run.cfg, max(run.cfg.n), DTYPES[run.cfg.dtype], run.device
    sets = []
    if cfg.flat:
        sets.append(("flat", lambda: flat(n, cfg.d, cfg.v, dtype=dtype, device=dev, seed=cfg.seed)))
    for h in cfg.entropies:
        make = lambda h=h: lm_like(
            n, cfg.d, cfg.v, entropy=h, dtype=dtype, device=dev, seed=cfg.seed,
            sort_vocab=cfg.sort_vocab,
        )  # fmt: skip
        sets.append((peaked_name(h), make))
    return sets


def _load(run: Run, name: str, make) -> Batch:
    """One data set; under torchrun rank 0's copy (the generators agree, but do not rely on it)."""
    t0 = time.perf_counter()
    batch = make()
    if run.world > 1:
        for t in (batch.e, batch.c, batch.targets):
            dist.broadcast(t, src=0)
        stats = [batch.mean_entropy, batch.mean_nll]
        dist.broadcast_object_list(stats, src=0)
        batch.mean_entropy, batch.mean_nll = stats
    run.log(
        f"data {name}: mean entropy {batch.mean_entropy:.3f} nats, mean NLL "
        f"{batch.mean_nll:.3f} ({time.perf_counter() - t0:.1f} s)"
    )
    return batch


# ---- truth, timing, memory ----


def fp64_truth(e, c, y, start: int, stop: int):
    """fp64 mean loss, dE and dC rows ``[start, stop)`` of ``F.cross_entropy(e @ c.T, y)``.

    ``c`` is the whole classifier; logits are materialized in fp64 a token chunk at a time.
    """
    e64, c64 = e.double(), c.double()
    n = e.shape[0]
    chunk = max(1, min(n, TRUTH_CHUNK_BYTES // (8 * c.shape[0])))
    loss = torch.zeros((), dtype=torch.float64, device=e.device)
    de = torch.empty_like(e64)
    dc = torch.zeros(stop - start, c.shape[1], dtype=torch.float64, device=e.device)
    for n0 in range(0, n, chunk):
        rows = slice(n0, n0 + chunk)
        z = e64[rows] @ c64.T
        yc = y[rows]
        lse = torch.logsumexp(z, dim=1)
        loss += (lse - z.gather(1, yc[:, None]).squeeze(1)).sum()
        dz = z.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
        dz[torch.arange(dz.shape[0], device=e.device), yc] -= 1.0
        dz /= n
        de[rows] = dz @ c64
        dc += dz[:, start:stop].T @ e64[rows]
        del z, dz
    return loss / n, de, dc


def _sync(run: Run) -> None:
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    if run.world > 1:
        dist.barrier()


def median_ms(run: Run, op, setup=None) -> float:
    """Median ms of ``op(setup())`` (``setup`` untimed) over ``rep`` after ``warmup`` more."""
    cfg, cuda = run.cfg, run.device.type == "cuda"
    for _ in range(cfg.warmup):
        op(setup() if setup else None)
    _sync(run)
    times = []
    for _ in range(cfg.rep):
        state = setup() if setup else None
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = op(state)
            end.record()
            times.append((start, end))
        else:
            t0 = time.perf_counter()
            out = op(state)
            times.append((time.perf_counter() - t0) * 1e3)
        del out, state
    if cuda:
        torch.cuda.synchronize(run.device)
        times = [s.elapsed_time(e) for s, e in times]
    return statistics.median(times)


def op_memory_mb(run: Run, op, setup=None, returns_grads: bool = False) -> float:
    """Peak during ``op`` minus allocated before it, minus the gradients it returns (MB)."""
    state = setup() if setup else None
    meter = MemoryMeter(run.device)
    with meter:
        out = op(state)
    grads = sum(g.numel() * g.element_size() for g in out) if returns_grads else 0
    del out, state
    # a backward that frees saved tensors before it writes the gradients can come out below 0
    return max(0.0, (meter.step_peak - grads) / MB)


def _kinds(fn, e, c, y) -> dict:
    """kind -> (setup, op, returns_grads); ``e`` and ``c`` require grad."""
    forward = lambda: fn(e, c, y)
    grads = lambda loss: torch.autograd.grad(loss, (e, c))
    return {
        "fw": (None, lambda _: forward(), False),
        "bw": (forward, grads, True),
        "fw+bw": (None, lambda _: grads(forward()), True),
    }


def _not_run(err: BaseException) -> str:
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return "n/a: out of memory"
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"n/a: {type(err).__name__}: {first[:160]}"


def _free(run: Run) -> None:
    """Give the caching allocator's blocks back between methods (one method's OOM leaves many)."""
    if run.device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def _reduce_max(run: Run, values: list[float]) -> list[float]:
    if run.world == 1 or not values:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=run.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def _agreed_status(run: Run, status: str) -> str:
    """The first rank's failure, or "ok" where every rank succeeded."""
    if run.world == 1:
        return status
    every = [None] * run.world
    dist.all_gather_object(every, status)
    return next((s for s in every if s != "ok"), "ok")


# ---- one shape ----


def _errors(run: Run, fn, e, c, y, truth) -> dict | None:
    """One forward + backward; its errors against ``truth`` (loss, dE, this rank's dC rows)."""
    loss = fn(e, c, y)
    de, dc = torch.autograd.grad(loss, (e, c))
    if truth is None:
        return None
    t_loss, t_de, t_dc = truth
    loss_err = (abs(loss.double() - t_loss) / t_loss.abs()).item()
    de_err = ((de.double() - t_de).norm() / t_de.norm()).item()
    dc_sq = torch.stack([(dc.double() - t_dc).norm() ** 2, t_dc.norm() ** 2])
    if run.world > 1:  # dC rows are split over the ranks: sum the squared norms
        dist.all_reduce(dc_sq)
    dc_diff, dc_ref = dc_sq.tolist()
    loss_err, de_err = _reduce_max(run, [loss_err, de_err])
    return dict(loss=loss_err, de=de_err, dc=math.sqrt(dc_diff / dc_ref))


def bench_shape(run: Run, data: str, batch: Batch, n: int, fns: dict) -> list[dict]:
    """Rows (floor first) for the first ``n`` tokens of one data set; ``fns``: name -> loss."""
    cfg, s = run.cfg, run.setting
    e, y = batch.e[:n], batch.targets[:n]
    c = batch.c[s.start : s.stop]
    rows = []
    floor_ms = lambda: _reduce_max(run, [median_ms(run, lambda _: M.gemm(e, c))])[0]
    if cfg.floor:
        with torch.no_grad():
            t = floor_ms()
        rows.append(
            dict(
                data=data,
                n=n,
                method=FLOOR,
                status="ok",
                gemm_ms=t,
                ms={k: FLOOR_FACTOR[k] * t for k in cfg.kinds},
            )
        )
    results = {name: dict(data=data, n=n, method=name, status="ok") for name in fns}
    live = lambda: [name for name in fns if results[name]["status"] == "ok"]
    e_, c_ = e.detach().requires_grad_(), c.detach().requires_grad_()

    # 1. one forward + backward per method: compiles, autotunes, and is compared with the truth
    truth = fp64_truth(e, batch.c, y, s.start, s.stop) if cfg.error else None
    for name in live():
        status = "ok"
        try:
            err = _errors(run, fns[name], e_, c_, y, truth)
            if err is not None:
                results[name]["err"] = err
        except Exception as exc:  # noqa: BLE001 - reported in the table, the sweep goes on
            status = _not_run(exc)
        results[name]["status"] = _agreed_status(run, status)
        _free(run)
    del truth
    _free(run)

    # 2. memory, then time, of each kind
    for name in live():
        status, ms, mem = "ok", {}, {}
        try:
            for kind, (setup, op, returns_grads) in _kinds(fns[name], e_, c_, y).items():
                if kind not in cfg.kinds:
                    continue
                if cfg.memory:
                    mem[kind] = op_memory_mb(run, op, setup, returns_grads)
                    _free(run)
                ms[kind] = median_ms(run, op, setup)
            if cfg.comm and run.world > 1:
                fw_bw = _kinds(fns[name], e_, c_, y)["fw+bw"][1]
                comm = profile_comm(functools.partial(fw_bw, None), run.device)
                results[name]["comm"] = _comm_over_ranks(run, comm)
        except Exception as err:  # noqa: BLE001
            status = _not_run(err)
        results[name]["status"] = _agreed_status(run, status)
        if results[name]["status"] == "ok":
            kinds = list(ms)
            results[name]["ms"] = dict(
                zip(kinds, _reduce_max(run, [ms[k] for k in kinds]), strict=True)
            )
            if mem:
                results[name]["mem_mb"] = dict(
                    zip(kinds, _reduce_max(run, [mem[k] for k in kinds]), strict=True)
                )
        _free(run)
        run.log(f"  {data} N {n} {name}: " + _summary(results[name]))
    if cfg.floor:  # the GPU's clocks drift with its power state: how far, over the methods
        with torch.no_grad():
            rows[0]["gemm_ms_after"] = floor_ms()
    return rows + list(results.values())


def _comm_over_ranks(run: Run, comm) -> dict:
    """The slowest rank's collective time; the least any rank overlapped (None: not measured)."""
    measured = comm.overlapped_ms is not None
    comm_ms, neg_hidden = _reduce_max(run, [comm.comm_ms, -(comm.overlapped_ms or 0.0)])
    return dict(ms=comm_ms, overlapped_ms=-neg_hidden if measured else None)


def _summary(row: dict) -> str:
    if row["status"] != "ok":
        return row["status"]
    parts = [f"{k} {v:.3g} ms" for k, v in row.get("ms", {}).items()]
    parts += [f"{k} {v:.1f} MB" for k, v in row.get("mem_mb", {}).items()]
    parts += [f"{k} err {v:.1e}" for k, v in row.get("err", {}).items()]
    return ", ".join(parts)


# ---- report ----


def environment(run: Run) -> dict:
    def version(pkg):
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None

    dev = run.device
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(dev)
        if dev.type == "cuda"
        else f"cpu ({platform.machine()})",
        "device_type": dev.type,
        "cpu_threads": torch.get_num_threads(),
        "world_size": run.world,
        "backend": dist.get_backend() if dist.is_initialized() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": version("triton"),
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "vpcce": version("vpcce"),
        "vpcce_impl": run.setting.vpcce_impl,
        "megatron-core": version("megatron-core"),
        "cut-cross-entropy": version("cut-cross-entropy"),
        "liger-kernel": version("liger-kernel"),
    }


# ---- main ----

_DEFINITIONS = {
    "fw": "forward with inputs requiring grad",
    "bw": "autograd.grad of the loss w.r.t. (e, c), forward untimed",
    "fw+bw": "both",
    "time": "median over rep repetitions after warmup (CUDA events / perf_counter); max over ranks",
    "op memory": "peak during the op minus allocated before it, minus returned gradients "
    "(below 0 reported as 0); max over ranks",
    "error": "|loss - t|/|t|, ||x - t||/||t|| vs an fp64 truth from the same inputs",
    "floor": "GEMM e @ c.T of the same shape: fw 1x, bw 3x, fw+bw 4x its median time",
}


def _write(run: Run, report: dict, png: bool) -> None:
    """Rank 0 writes JSON and markdown (and the PNG): after every shape, so a run that is
    stopped part-way leaves what it measured."""
    if run.rank != 0:
        return
    cfg = run.cfg
    out = cfg.out_dir()
    out.mkdir(parents=True, exist_ok=True)
    if png:
        report["png"] = plot(report, out / f"{cfg.name}.png") or f"{cfg.name}.png"
    (out / f"{cfg.name}.md").write_text(markdown(report) + "\n")
    (out / f"{cfg.name}.json").write_text(json.dumps(report, indent=1) + "\n")


def bench(cfg: BenchConfig) -> dict:
    """Run the benchmark; rank 0 writes JSON, markdown and PNG and prints the table last."""
    run = _start(cfg)
    try:
        fns, unavailable = {}, {}
        for name in cfg.methods:
            try:
                fns[name] = M.build(name, run.setting)
            except M.Unavailable as err:
                unavailable[name] = str(err)
                run.log(f"{name}: not run: {err}")
        report = dict(
            config=dataclasses.asdict(cfg),
            env=environment(run),
            methods={name: M.METHODS[name].about for name in cfg.methods},
            definitions=_DEFINITIONS,
            shard=dict(rank0_start=run.setting.start, rank0_stop=run.setting.stop),
            data=[],
            results=[],
            unavailable=unavailable,
            png=None,
            complete=False,
        )
        for data_name, make in _data_sets(run):
            batch = _load(run, data_name, make)
            report["data"].append(
                dict(name=data_name, mean_entropy=batch.mean_entropy, mean_nll=batch.mean_nll)
            )
            for n in cfg.n:
                run.log(f"{data_name} N {n}:")
                report["results"] += bench_shape(run, data_name, batch, n, fns)
                _write(run, report, png=n == cfg.n[-1])
            del batch
            _free(run)
        report["complete"] = True
        _write(run, report, png=True)
        if run.rank == 0:
            run.log(f"wrote {cfg.out_dir()}/{cfg.name}.{{json,md,png}}")
            print(markdown(report), flush=True)
        if run.world > 1:
            # leave together: a rank tearing down gloo while its peer still writes the report
            # was seen to abort ("terminate called without an active exception")
            dist.barrier()
        return report
    finally:
        if run.owns_group:
            dist.destroy_process_group()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Config keys: " + ", ".join(f.name for f in dataclasses.fields(BenchConfig)),
    )
    parser.add_argument("--config", default=None, help="YAML file of config keys")
    parser.add_argument("overrides", nargs="*", help="key=value (value parsed as YAML)")
    args = parser.parse_args(argv)
    return bench(load_config(args.config, args.overrides))


if __name__ == "__main__":
    main()
    exit_process(0)

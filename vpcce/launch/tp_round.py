"""One multi-rank round: the vocab-parallel check, Megatron TP parity and TP scaling, batched.

    python -m vpcce.launch.tp_round --worlds 2,4,8 --out $OUT/tp     # GPUs: nccl, H100 configs
    python -m vpcce.launch.tp_round --cpu --worlds 2 --out /tmp/tp    # CPU: gloo, tiny configs

``--parts check,train`` / ``--parts scaling`` split the round over calls of a time-limited machine
(Megatron-Core must be importable: ``PYTHONPATH`` reaches the ranks).

Every part runs ``torchrun --standalone --nproc_per_node W`` per world size as a subprocess, so a
failing world does not stop the others; each run's output is kept in ``<out>/<part>_w<W>.log``
with its files beside it. The summary (``<out>/tp_round.json`` and markdown tables) is printed
last; the exit status is 1 if any part failed.

1. check: `vpcce.launch.check` (sequence parallelism on and off, a prime vocabulary, so uneven
   shards) in fp32 and bf16: PASS / FAIL of every rank.
2. train: `vpcce.launch.train` with ``--train-config`` (GPU: Megatron-Core's GPTModel,
   tensor-parallel over the ranks) for ``--train-steps`` steps: the largest per-step relative
   difference between the vpcce loss and the materialized path's (GPU: Megatron's own), and the
   peak memory per rank of both.
3. scaling: `vpcce.launch.bench` for each ``--bench-configs`` at world 1 and every world, methods
   vpcce_exact and megatron, 5-nat data (GPU: one N per shape): per-rank forward+backward time
   and op memory, the scaling efficiency ``t(1) / (W * t(W))``, and the time in collectives of
   one fw+bw with the part other GPU work overlaps (`vpcce.launch.comm_profile`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

# the repository's configs (relative paths given on the command line are the caller's)
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
# one N, 5-nat data; the time in collectives of one fw+bw
BENCH_OVERRIDES = ["flat=false", "entropies=[5]", "kinds=[fw,fw+bw]", "comm=true"]
GPU = dict(
    backend="nccl",
    train_config=str(CONFIGS / "train/gpt_megatron_h100.yaml"),
    # the shapes of issue 8's scaling table; errors are the check's business (no fp64 truth here)
    bench_configs=[
        f"{CONFIGS}/bench/llama3_h100.yaml:16384",
        f"{CONFIGS}/bench/gemma2_h100.yaml:8192",
    ],
    bench_overrides=[*BENCH_OVERRIDES, "error=false"],
    check_dtypes=["fp32", "bf16"],
)
CPU = dict(
    backend="gloo",
    train_config=str(CONFIGS / "train/cpu_demo.yaml"),
    bench_configs=[str(CONFIGS / "bench/cpu_tiny.yaml")],
    bench_overrides=[*BENCH_OVERRIDES, "warmup=0", "rep=2"],
    check_dtypes=["fp32"],
)
BENCH_METHODS = ("vpcce_exact", "megatron")


def torchrun_command(module: str, args: list[str], world: int) -> list[str]:
    """``torchrun --standalone --nproc_per_node world -m module *args`` (this Python)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc_per_node", str(world), "-m", module, *args]  # fmt: skip


def torchrun(module: str, args: list[str], world: int, log: Path, timeout: float) -> int:
    """Run `torchrun_command`, its output into ``log``; on timeout stop it and its ranks (124).

    The output goes to the file, not a pipe: ranks that outlive torchrun would hold a pipe open.
    """
    cmd = torchrun_command(module, args, world)
    print(f"$ {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
    env = {"OMP_NUM_THREADS": "1", **os.environ}  # the ranks share the CPUs
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            # SIGTERM: torchrun passes it on to its ranks (they run in their own sessions, so a
            # SIGKILL of torchrun alone would leave them running, holding the GPUs)
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    with log.open("a") as out:
        out.write(f"\ntimed out after {timeout} s\n")
    return 124


def check(world: int, dtype: str, backend: str, out: Path, timeout: float) -> dict:
    log = out / f"check_{dtype}_w{world}.log"
    code = torchrun(
        "vpcce.launch.check", ["--backend", backend, "--dtype", dtype], world, log, timeout
    )
    ranks = [line for line in log.read_text().splitlines() if line.startswith("rank ")]
    return dict(
        world=world,
        dtype=dtype,
        exit=code,
        ranks=ranks,
        passed=code == 0 and len(ranks) == world and all("PASS" in r for r in ranks),
    )


def train(world: int, config: str, steps: int, out: Path, timeout: float) -> dict:
    folder = out / f"train_w{world}"
    args = ["--config", config, f"steps={steps}", "memory_every=1", f"out_dir={folder}"]
    code = torchrun("vpcce.launch.train", args, world, out / f"train_w{world}.log", timeout)
    row = dict(world=world, exit=code)
    record_path = folder / "train.json"
    if code != 0 or not record_path.exists():
        return row
    record = json.loads(record_path.read_text())
    paths = record["paths"]
    row["max_rel_loss_diff"] = record["comparison"]["max_rel_diff"]
    for name, res in paths.items():
        row[f"{name}_step_peak_mib"] = res["step_peak_bytes"] / 2**20
        if res["loss_op_peak_bytes"] is not None:
            row[f"{name}_loss_op_peak_mib"] = res["loss_op_peak_bytes"] / 2**20
    return row


def bench(world: int, config: str, overrides: list[str], out: Path, timeout: float) -> list[dict]:
    """``config`` is a YAML path, optionally ``path:N`` for one token count."""
    config, _, n = config.partition(":")
    overrides = [*overrides, f"n=[{n}]"] if n else overrides
    name = Path(config).stem
    folder = out / f"bench_{name}_w{world}"
    args = [
        "--config",
        config,
        f"methods=[{','.join(BENCH_METHODS)}]",
        f"out={folder}",
        f"name={name}",
        *overrides,
    ]
    code = torchrun("vpcce.launch.bench", args, world, out / f"bench_{name}_w{world}.log", timeout)
    report_path = folder / f"{name}.json"
    if code != 0 or not report_path.exists():
        return [dict(config=name, world=world, exit=code)]
    report = json.loads(report_path.read_text())
    rows = [
        dict(config=name, world=world, exit=code, method=m, status=f"not run: {why}")
        for m, why in report["unavailable"].items()
    ]
    for r in report["results"]:
        if r["method"] in BENCH_METHODS:
            rows.append(
                dict(
                    config=name,
                    world=world,
                    exit=code,
                    method=r["method"],
                    n=r["n"],
                    status=r["status"],
                    ms=r.get("ms", {}),
                    mem_mb=r.get("mem_mb", {}),
                    comm=r.get("comm"),
                )
            )
    return rows


def scaling_efficiency(rows: list[dict]) -> None:
    """Add ``efficiency = t(1) / (W * t(W))`` (fw+bw) to every row that has a world-1 twin."""
    base = {(r["config"], r.get("method"), r.get("n")): r for r in rows if r["world"] == 1}
    for r in rows:
        one = base.get((r["config"], r.get("method"), r.get("n")))
        t1, tw = (x.get("ms", {}).get("fw+bw") if x else None for x in (one, r))
        if t1 and tw:
            r["efficiency"] = t1 / (r["world"] * tw)


def markdown(summary: dict) -> str:
    lines = ["#### check (every rank PASS)", "", "| world | dtype | result |", "|---|---|---|"]
    lines += [
        f"| {c['world']} | {c['dtype']} | {'PASS' if c['passed'] else 'FAIL'} (exit {c['exit']}) |"
        for c in summary["check"]
    ]
    lines += [
        "",
        "#### train: vpcce vs materialized loss path",
        "",
        "| world | max rel loss diff | step peak MiB (vpcce / materialized) |",
        "|---|---|---|",
    ]
    for t in summary["train"]:
        if "max_rel_loss_diff" not in t:
            lines.append(f"| {t['world']} | failed (exit {t['exit']}) | |")
            continue
        lines.append(
            f"| {t['world']} | {t['max_rel_loss_diff']:.2e} | "
            f"{t['vpcce_step_peak_mib']:.0f} / {t['materialized_step_peak_mib']:.0f} |"
        )
    lines += [
        "",
        "#### scaling (per rank, fw+bw)",
        "",
        "| config | N | method | world | fw+bw ms | fw+bw MB | efficiency | collectives ms "
        "(overlapped) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["scaling"]:
        if r.get("status", "failed") != "ok":
            lines.append(
                f"| {r['config']} | {r.get('n', '')} | {r.get('method', '')} | "
                f"{r['world']} | {r.get('status', 'failed')} (exit {r['exit']}) | | | |"
            )
            continue
        eff = f"{r['efficiency']:.2f}" if "efficiency" in r else "-"
        mem = r["mem_mb"].get("fw+bw")
        comm = r.get("comm")
        hidden = None if comm is None else comm["overlapped_ms"]
        comm_cell = "-" if comm is None else f"{comm['ms']:.3g}"
        comm_cell += "" if hidden is None else f" ({hidden:.3g})"
        lines.append(
            f"| {r['config']} | {r['n']} | {r['method']} | {r['world']} | "
            f"{r['ms']['fw+bw']:.3g} | {'-' if mem is None else f'{mem:.0f}'} | {eff} | "
            f"{comm_cell} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", default="2,4,8", help="comma-separated world sizes (> 1)")
    parser.add_argument("--cpu", action="store_true", help="gloo and the tiny CPU configs")
    parser.add_argument("--out", default="out/tp_round")
    parser.add_argument("--parts", default="check,train,scaling")
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--train-config", default=None)
    parser.add_argument("--bench-configs", default=None, help="comma-separated YAML[:N]")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per torchrun")
    args = parser.parse_args(argv)
    worlds = [int(w) for w in args.worlds.split(",")]
    if any(w < 2 for w in worlds):
        parser.error(f"--worlds must be > 1, got {worlds}")
    if not args.cpu and torch.cuda.device_count() < max(worlds):
        parser.error(f"{torch.cuda.device_count()} GPUs for worlds {worlds} (--cpu for gloo)")
    preset = CPU if args.cpu else GPU
    train_config = args.train_config or preset["train_config"]
    bench_configs = args.bench_configs.split(",") if args.bench_configs else preset["bench_configs"]
    parts = set(args.parts.split(","))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    summary = dict(
        worlds=worlds,
        device="cpu" if args.cpu else torch.cuda.get_device_name(),
        check=[],
        train=[],
        scaling=[],
    )
    for w in worlds:
        if "check" in parts:
            summary["check"] += [
                check(w, d, preset["backend"], out, args.timeout) for d in preset["check_dtypes"]
            ]
        if "train" in parts:
            summary["train"].append(train(w, train_config, args.train_steps, out, args.timeout))
    if "scaling" in parts:
        for config in bench_configs:
            for w in [1, *worlds]:
                summary["scaling"] += bench(w, config, preset["bench_overrides"], out, args.timeout)
        scaling_efficiency(summary["scaling"])
    (out / "tp_round.json").write_text(json.dumps(summary, indent=1) + "\n")
    table = markdown(summary)
    (out / "tp_round.md").write_text(table + "\n")
    print(table, flush=True)
    failed = [c for c in summary["check"] if not c["passed"]]
    failed += [t for t in summary["train"] if "max_rel_loss_diff" not in t]
    failed += [r for r in summary["scaling"] if r.get("status") != "ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

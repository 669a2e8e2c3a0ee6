"""The benchmark's report: the markdown table and the PNG (`vpcce.launch.bench` measures).

Both read only the report dict that `vpcce.launch.bench` also writes as JSON: ``config``,
``env``, ``data`` (name, mean entropy, mean NLL), ``results`` (one row per data set, N and method:
``status``, then ``ms`` and ``mem_mb`` per kind, ``err`` and, with ``comm``, ``comm``),
``unavailable`` (method -> reason), ``shard``, ``png`` and ``complete``.
"""

from __future__ import annotations

from pathlib import Path

FLOOR = "gemm"  # the floor row's method name
FLOOR_FACTOR = {"fw": 1, "bw": 3, "fw+bw": 4}  # GEMMs of the same shape an exact op needs


def _fmt(x, spec) -> str:
    return "–" if x is None else format(x, spec)


def markdown(report: dict) -> str:
    cfg, env = report["config"], report["env"]
    kinds = cfg["kinds"]
    world = f"world {env['world_size']}"
    if env["world_size"] > 1:
        shard = report["shard"]
        world += f" (vocab-parallel; rank 0 rows [{shard['rank0_start']}, {shard['rank0_stop']}))"
    lines = [
        f"### vpcce bench `{cfg['name']}`: D {cfg['d']} x V {cfg['v']}, {cfg['dtype']}, "
        f"{env['device']}, {world}, {env['date']}",
        "",
    ]
    for d in report["data"]:
        lines.append(
            f"- `{d['name']}`: mean entropy {d['mean_entropy']:.2f} nats, "
            f"mean NLL {d['mean_nll']:.2f}"
        )
    lines.append("")
    head = ["data", "N", "method"] + [f"{k} ms" for k in kinds]
    if cfg["memory"]:
        head += [f"{k} MB" for k in kinds]
    if cfg["error"]:
        head += ["loss err", "dE err", "dC err"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["results"]:
        label = "floor: GEMM e@c.T (x1 / x3 / x4)" if r["method"] == FLOOR else r["method"]
        cells = [r["data"], str(r["n"]), label]
        if r["status"] != "ok":
            cells.append(r["status"])
            cells += [""] * (len(head) - len(cells))
        else:
            ms, mem, err = r.get("ms", {}), r.get("mem_mb", {}), r.get("err", {})
            cells += [_fmt(ms.get(k), ".3g") for k in kinds]
            if cfg["memory"]:
                cells += [_fmt(mem.get(k), ".1f") for k in kinds]
            if cfg["error"]:
                cells += [_fmt(err.get(k), ".1e") for k in ("loss", "de", "dc")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [""] + [f"- not run: `{k}`: {v}" for k, v in report["unavailable"].items()]
    for r in report["results"]:
        if r["method"] == FLOOR and "gemm_ms_after" in r:
            lines.append(
                f"- floor drift ({r['data']}, N {r['n']}): the GEMM took {r['gemm_ms']:.3g} ms "
                f"before the methods, {r['gemm_ms_after']:.3g} ms after them"
            )
    for r in report["results"]:
        if "comm" in r and r["status"] == "ok":
            hidden = r["comm"]["overlapped_ms"]
            lines.append(
                f"- collectives of one fw+bw, `{r['method']}` ({r['data']}, N {r['n']}): "
                f"{r['comm']['ms']:.3g} ms (slowest rank)"
                + ("" if hidden is None else f", {hidden:.3g} ms of it overlapped by other kernels")
            )
    if not report.get("complete", True):
        lines.append("- incomplete: written part-way through the run")
    if (report.get("png") or "").startswith("no PNG"):
        lines.append(f"- {report['png']}")
    return "\n".join(lines).rstrip()


def plot(report: dict, path: Path) -> str | None:
    """Two panels (fw+bw time, op memory vs N; log scales); returns why not, if it cannot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError as err:
        return f"no PNG: matplotlib is not importable ({err})"
    cfg = report["config"]
    names = [d["name"] for d in report["data"]]
    data = cfg["plot_data"] if cfg["plot_data"] in names else None
    data = data or next((name for name in names if name != "flat"), names[0])
    kind = "fw+bw" if "fw+bw" in cfg["kinds"] else cfg["kinds"][-1]
    rows = [r for r in report["results"] if r["data"] == data and r["status"] == "ok"]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in dict.fromkeys(r["method"] for r in rows):
        mine = sorted((r for r in rows if r["method"] == name), key=lambda r: r["n"])
        floor = dict(linestyle="--", marker="x", color="gray")  # a marker: one N is one point
        style = floor if name == FLOOR else dict(marker="o")
        label = f"GEMM floor (x{FLOOR_FACTOR[kind]})" if name == FLOOR else name
        pts = [(r["n"], r["ms"][kind]) for r in mine if r.get("ms", {}).get(kind, 0) > 0]
        if pts:
            ax_t.plot(*zip(*pts, strict=True), label=label, **style)
        pts = [(r["n"], r["mem_mb"][kind]) for r in mine if r.get("mem_mb", {}).get(kind, 0) > 0]
        if pts and name != FLOOR:
            ax_m.plot(*zip(*pts, strict=True), label=label, **style)
    for ax, what in ((ax_t, f"median {kind} time (ms)"), (ax_m, f"{kind} op memory (MB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(cfg["n"], [str(n) for n in cfg["n"]])
        # no minor ticks on N (powers of 2 are labelled); on y they carry the labels when the
        # values span less than a decade (one N, or close methods)
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("N (tokens)")
        ax.set_ylabel(what)
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(
        f"{cfg['name']}: D {cfg['d']} x V {cfg['v']} {cfg['dtype']}, data {data}, "
        f"{report['env']['device']}, world {report['env']['world_size']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None

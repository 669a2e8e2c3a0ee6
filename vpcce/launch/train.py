"""Train a small language model with its LM head sharded by vocabulary; compare vpcce's loss with
the framework's own materialized loss path from the same seed.

    torchrun --standalone --nproc_per_node 2 -m vpcce.launch.train \\
        --config configs/train/cpu_demo.yaml [key=value ...]

Each name in ``paths`` trains the same model from the same seed on the same batches:

- ``model: tiny`` (any device): `vpcce.launch.model.TinyLM`, a replicated plain-PyTorch body whose
  ``[V, D]`` head is sharded over the ranks; ``vpcce`` is `vpcce.linear_cross_entropy`,
  ``materialized`` is Megatron's algorithm on ``[N, V / W]`` fp32 logits (`vpcce.launch.losses`).
- ``model: megatron_gpt`` (CUDA): Megatron-Core's GPTModel with tensor parallelism over the ranks;
  ``vpcce`` goes through `vpcce.integrations.megatron`, ``materialized`` is GPTModel's own loss
  (`vpcce.launch.megatron_gpt`, imported only for this model).

Rank 0 shows a progress bar and a log line every ``log_every`` steps, then prints a summary (final
losses, mean |difference| of the curves, peak memory, time) and writes ``train.json`` and
``loss.png`` to ``out_dir`` (default ``out/train/<config name>``). Peak memory is defined in
`vpcce.launch.memory`; for ``tiny`` it is also measured for the loss op alone (forward and backward
of the head + loss on a detached copy of the hidden states, whose gradient then flows on into the
body), the place where vpcce and the materialized path differ.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from vpcce import VocabParallelOptions
from vpcce.launch.config import TrainConfig, load_config
from vpcce.launch.corpus import MarkovCorpus
from vpcce.launch.memory import MEMORY_DEFINITION, MemoryMeter, NoMeter
from vpcce.launch.process_exit import exit_process

# ---------------------------------------------------------------------------------------------
# the tiny model's job: forward + backward of one step with the loss op measured on its own


class TinyJob:
    """`TinyLM` body (replicated) + this rank's head shard + one of the two loss paths, trained
    with AdamW."""

    def __init__(self, cfg: TrainConfig, path: str, opts: VocabParallelOptions, device):
        from vpcce.launch.losses import LOSSES
        from vpcce.launch.model import TinyLM, head_shard

        torch.manual_seed(cfg.seed)
        self.model = TinyLM(cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.seq_len)
        self.model.to(device=device, dtype=cfg.torch_dtype)
        w = head_shard(cfg.vocab_size, cfg.d_model, opts.start, opts.stop, cfg.seed + 1)
        self.head = torch.nn.Parameter(w.to(device=device, dtype=cfg.torch_dtype))
        self.loss_fn, self.opts = LOSSES[path], opts
        self.options = {"impl": cfg.impl, "chunk_bytes": cfg.chunk_bytes} if path == "vpcce" else {}
        self.grad_clip = cfg.grad_clip
        self.optimizer = torch.optim.AdamW(
            [*self.model.parameters(), self.head],
            lr=cfg.lr,
            betas=(0.9, 0.95),
            weight_decay=cfg.weight_decay,
            fused=True,  # fused: 8x faster than the loop on CPU
        )

    def replicated_parameters(self) -> list[torch.Tensor]:
        return list(self.model.parameters())

    def train_step(self, tokens: torch.Tensor, meter: MemoryMeter, lr: float) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        with meter:
            h = self.model(tokens)
            # the loss op on a leaf copy of h, so its memory is measured alone; then into the body
            h_leaf = h.detach().requires_grad_()
            with meter.window():
                loss = self.loss_fn(h_leaf, self.head, tokens, self.opts, **self.options)
                loss.backward()
            h.backward(h_leaf.grad)
        if self.grad_clip:
            self._clip_gradients()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        return loss.detach()

    def _clip_gradients(self) -> None:
        """Scale all gradients so the global norm (body once, every rank's head shard) is at most
        ``grad_clip``; every rank computes the same norm, so the replicas stay identical."""
        body = [p.grad for p in self.model.parameters() if p.grad is not None]
        head_sq = self.head.grad.float().pow(2).sum()
        if dist.get_world_size(self.opts.group) > 1:
            dist.all_reduce(head_sq, group=self.opts.group)
        norm = (torch.stack([g.float().pow(2).sum() for g in body]).sum() + head_sq).sqrt()
        scale = (self.grad_clip / (norm + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_([*body, self.head.grad], scale)


def build_job(cfg: TrainConfig, path: str, opts: VocabParallelOptions, device):
    if cfg.model == "tiny":
        return TinyJob(cfg, path, opts, device)
    from vpcce.launch.megatron_gpt import MegatronGPTJob  # megatron-core only for this model

    return MegatronGPTJob(cfg, path, device)


# ---------------------------------------------------------------------------------------------
# the training loop, the same for every job and path


def _lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to 1, then cosine decay to ``min_lr_ratio``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _max_over_ranks(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def _replica_divergence(params: list[torch.Tensor], device) -> float:
    """Largest |difference| between any rank's replicated parameters and rank 0's (should be 0)."""
    if not params:
        return 0.0
    flat = torch.cat([p.detach().reshape(-1).float() for p in params])
    ref = flat.clone()
    dist.broadcast(ref, src=0)
    return _max_over_ranks([(flat - ref).abs().max().item()], device)[0]


def train_path(cfg: TrainConfig, path: str, corpus: MarkovCorpus, opts, device, rank: int) -> dict:
    job = build_job(cfg, path, opts, device)
    meter, no_meter = MemoryMeter(device), NoMeter()
    losses, step_ms, measured, step_peak, loss_peak = [], [], [], 0, None
    bar = tqdm(
        total=cfg.steps,
        desc=f"{path:>12}",
        disable=rank != 0,
        dynamic_ncols=True,
        mininterval=0.1 if sys.stderr.isatty() else 5.0,
    )
    dist.barrier()
    wall0 = time.perf_counter()
    for step in range(cfg.steps):
        tokens = corpus.batch(cfg.batch_size, cfg.seq_len, step, cfg.seed).to(device)
        lr = cfg.lr * _lr_factor(step, cfg)
        # CPU memory tracking slows a step down: it runs on a few steps (the shapes never change)
        m = meter if device.type == "cuda" or step % cfg.memory_every == 0 else no_meter
        t0 = time.perf_counter()
        loss = job.train_step(tokens, m, lr)
        value = loss.item()  # waits for the step: the time below is the whole step
        step_ms.append(1e3 * (time.perf_counter() - t0))
        measured.append(m is meter)
        if m is meter:
            step_peak = max(step_peak, m.step_peak)
            if m.window_peak is not None:
                loss_peak = max(loss_peak or 0, m.window_peak)
        losses.append(value)
        bar.update()
        bar.set_postfix(loss=f"{value:.4f}", refresh=False)
        if rank == 0 and ((step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps or step == 0):
            bar.write(
                f"[{path}] step {step + 1:>5}/{cfg.steps}  loss {value:.4f}  "
                f"lr {lr:.2e}  step {step_ms[-1]:.0f} ms"
            )
        if not math.isfinite(value):
            bar.close()
            raise FloatingPointError(f"[{path}] loss is {value} at step {step + 1}")
    _sync(device)
    dist.barrier()
    wall = time.perf_counter() - wall0
    bar.close()
    step_peak, loss_peak_max = _max_over_ranks([step_peak, loss_peak or 0], device)
    replicated = job.replicated_parameters()
    return {
        "losses": losses,
        "step_ms": step_ms,
        "memory_measured": measured,  # steps whose time includes the CPU memory tracker
        "wall_s": wall,
        "step_peak_bytes": int(step_peak),
        "loss_op_peak_bytes": None if loss_peak is None else int(loss_peak_max),
        "replica_max_abs_diff": None
        if replicated is None
        else _replica_divergence(replicated, device),
    }


# ---------------------------------------------------------------------------------------------
# reporting (rank 0)


def _fmt(x, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def _mib(b) -> str:
    if b is None:
        return "n/a"
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"


def _median_step_ms(res: dict) -> float:
    """Median over the steps run without the CPU memory tracker (all steps on CUDA); the median
    leaves out the first steps' one-time costs (Triton autotuning and compilation)."""
    plain = [t for t, m in zip(res["step_ms"], res["memory_measured"], strict=True) if not m]
    return statistics.median(plain or res["step_ms"])


def compare(results: dict) -> dict | None:
    if not {"vpcce", "materialized"} <= set(results):
        return None
    a, b = results["vpcce"]["losses"], results["materialized"]["losses"]
    diff = [abs(x - y) for x, y in zip(a, b, strict=True)]
    return {
        "first_abs_diff": diff[0],
        "mean_abs_diff": sum(diff) / len(diff),
        "max_abs_diff": max(diff),
        "max_rel_diff": max(d / abs(y) for d, y in zip(diff, b, strict=True)),
    }


def summary_table(results: dict, comparison: dict | None, corpus_info: dict) -> str:
    names = list(results)
    rows = [
        ("final loss (last step)", [f"{results[n]['losses'][-1]:.4f}" for n in names]),
        (
            "mean loss, last 10 steps",
            [
                f"{sum(results[n]['losses'][-10:]) / len(results[n]['losses'][-10:]):.4f}"
                for n in names
            ],
        ),
        ("loss-op peak memory", [_mib(results[n]["loss_op_peak_bytes"]) for n in names]),
        ("step peak memory", [_mib(results[n]["step_peak_bytes"]) for n in names]),
        ("median step time", [f"{_median_step_ms(results[n]):.0f} ms" for n in names]),
        ("wall time", [f"{results[n]['wall_s']:.1f} s" for n in names]),
        ("replica max |diff|", [_fmt(results[n]["replica_max_abs_diff"], ".1e") for n in names]),
    ]
    width = max(len(r[0]) for r in rows) + 2
    lines = [" " * width + "".join(f"{n:>16}" for n in names)]
    lines += [f"{label:<{width}}" + "".join(f"{v:>16}" for v in vals) for label, vals in rows]
    if comparison:
        lines.append(
            f"loss curves: |vpcce - materialized| first step {comparison['first_abs_diff']:.2e}, "
            f"mean {comparison['mean_abs_diff']:.2e}, max {comparison['max_abs_diff']:.2e}"
        )
    lines.append(
        f"reference: ln V = {corpus_info['log_vocab']:.3f}, unigram entropy = "
        f"{corpus_info['unigram_entropy']:.3f}, entropy rate (best possible) = "
        f"{corpus_info['entropy_rate']:.3f} nats"
    )
    return "\n".join(lines)


def write_plot(path: Path, results: dict, corpus_info: dict, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            "matplotlib is not installed (pip install -e '.[bench]'): no loss.png", file=sys.stderr
        )
        return False
    both = {"vpcce", "materialized"} <= set(results)
    fig, axes = plt.subplots(
        2 if both else 1,
        1,
        figsize=(8, 6.5 if both else 4.5),
        squeeze=False,
        sharex=True,
        gridspec_kw={"height_ratios": [3, 1.2] if both else [1]},
    )
    ax = axes[0, 0]
    styles = {"vpcce": {"lw": 1.6}, "materialized": {"lw": 1.2, "ls": "--"}}
    for name, res in results.items():
        steps = range(1, len(res["losses"]) + 1)
        mem = (
            res["loss_op_peak_bytes"]
            if res["loss_op_peak_bytes"] is not None
            else res["step_peak_bytes"]
        )
        kind = "loss-op" if res["loss_op_peak_bytes"] is not None else "step"
        ax.plot(
            steps, res["losses"], label=f"{name} ({kind} peak {_mib(mem)})", **styles.get(name, {})
        )
    ax.axhline(corpus_info["unigram_entropy"], color="gray", ls=":", lw=1, label="unigram entropy")
    ax.axhline(
        corpus_info["entropy_rate"], color="black", ls=":", lw=1, label="entropy rate (optimum)"
    )
    ax.set_ylabel("loss (nats)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    if both:
        a, b = results["vpcce"]["losses"], results["materialized"]["losses"]
        floor = 1e-8  # equal losses are drawn here (a log axis has no 0)
        diff = [max(abs(x - y), floor) for x, y in zip(a, b, strict=True)]
        axes[1, 0].semilogy(range(1, len(diff) + 1), diff, lw=1, color="C2")
        axes[1, 0].set_ylim(bottom=floor / 2)
        axes[1, 0].set_ylabel("|vpcce - materialized|\n(equal: 1e-8)", fontsize=8)
        axes[1, 0].grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _environment(world: int) -> dict:
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"],
                capture_output=True,
                text=True,
                cwd=Path(__file__).parent,
                timeout=5,
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        commit = None
    import vpcce

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "vpcce": vpcce.__version__,
        "git_commit": commit,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "world_size": world,
        "backend": dist.get_backend(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


# ---------------------------------------------------------------------------------------------
# entry point


def _init_distributed(cfg: TrainConfig) -> torch.device:
    if "RANK" not in os.environ:  # a plain `python -m vpcce.launch.train`: a group of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    if cfg.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(
                f"config {cfg.name!r} has device: cuda but no CUDA device is available"
            )
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group(cfg.backend, timeout=datetime.timedelta(minutes=10))
    return device


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vpcce.launch.train", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--config", required=True, help="YAML file (configs/train/*.yaml)")
    parser.add_argument(
        "overrides", nargs="*", help="key=value, parsed as YAML (e.g. steps=5 out_dir=/tmp/x)"
    )
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except (OSError, ValueError) as exc:
        parser.error(str(exc))
    device = _init_distributed(cfg)
    try:
        code = _run(cfg, device)
        dist.barrier()  # leave together: rank 0 may still be writing (see `process_exit`)
        return code
    finally:
        dist.destroy_process_group()


def _run(cfg: TrainConfig, device: torch.device) -> int:
    rank, world = dist.get_rank(), dist.get_world_size()
    opts = VocabParallelOptions.from_vocab(cfg.vocab_size)
    shards = [None] * world
    dist.all_gather_object(shards, [opts.start, opts.stop])
    corpus = MarkovCorpus(
        cfg.vocab_size, cfg.num_classes, cfg.branching, cfg.zipf_exponent, seed=cfg.corpus_seed
    )
    corpus_info = {
        "log_vocab": math.log(cfg.vocab_size),
        "unigram_entropy": corpus.unigram_entropy,
        "entropy_rate": corpus.entropy_rate,
    }
    if rank == 0:
        n = cfg.batch_size * (cfg.seq_len - 1)
        print(
            f"{cfg.name}: model {cfg.model}, {world} rank(s) over {dist.get_backend()} "
            f"on {device.type}, "
            f"V={cfg.vocab_size} (shards {shards}), D={cfg.d_model}, {n} predicted tokens/step, "
            f"{cfg.steps} steps, paths {cfg.paths}"
        )
        print(
            f"corpus: ln V = {corpus_info['log_vocab']:.3f}, unigram entropy "
            f"{corpus_info['unigram_entropy']:.3f}, "
            f"entropy rate {corpus_info['entropy_rate']:.3f} nats"
        )
    results = {}
    for path in cfg.paths:
        results[path] = train_path(cfg, path, corpus, opts, device, rank)
    if rank != 0:
        return 0
    comparison = compare(results)
    print(summary_table(results, comparison, corpus_info))
    out = cfg.resolved_out_dir()
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "config": dataclasses.asdict(cfg),
        "vocab_shards": shards,
        "corpus": corpus_info,
        "memory_definition": MEMORY_DEFINITION,
        "paths": results,
        "comparison": comparison,
        "environment": _environment(world),
    }
    (out / "train.json").write_text(json.dumps(record, indent=1))
    title = (
        f"{cfg.name}: {cfg.model}, V={cfg.vocab_size} sharded over {world} "
        f"rank{'s' * (world > 1)}, {cfg.batch_size}x{cfg.seq_len} tokens/step"
    )
    wrote_png = write_plot(out / "loss.png", results, corpus_info, title)
    print(f"wrote {out / 'train.json'}" + (f" and {out / 'loss.png'}" if wrote_png else ""))
    return 0


if __name__ == "__main__":
    exit_process(main())

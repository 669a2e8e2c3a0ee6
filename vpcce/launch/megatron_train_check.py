"""Train a Megatron-Core GPTModel with Megatron's own loss and with vpcce's, from the same seed.

    python -m vpcce.launch.megatron_train_check            # one CUDA GPU, TP = 1
    python -m vpcce.launch.megatron_train_check --help     # sizes, steps, tolerance

The default model: ~103M parameters (12 layers, hidden 512, 8 heads, tied embeddings,
V = 128256), sequence 2048 x micro-batch 4, bf16 as Megatron-LM runs it (``Float16Module``,
``DistributedDataParallel`` with fp32 ``main_grad`` buffers, Megatron's mixed-precision Adam with
fp32 master weights), trained ``--steps`` steps on a learnable synthetic corpus (each token is
followed by a fixed successor with probability 0.5, by a Zipf-distributed token otherwise, so
that the loss falls from ln V within the first steps).
Both runs start from the same weights (the first run's initial state dict is loaded into the
second) and see the same batches; the vpcce run differs only by ``patch(model)``.

A third run repeats Megatron's own (``--no-rerun`` skips it): its difference from the first is
the run-to-run noise of the same training (nondeterministic kernels, Adam's sensitivity to tiny
gradient differences), the scale against which vpcce's difference is read.

Prints one line per step (the losses and relative differences) and a summary table with the
peak GPU memory of each run (``torch.cuda.max_memory_allocated`` over the run, parameters and
optimizer state included, and the largest step peak above the memory allocated at the step's
start); writes the numbers as JSON (``--out``). Exits 1 when a step's losses differ by more than
``--rtol``. ``--device cpu`` (gloo, fp32) is for smoke tests of this script with tiny sizes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from vpcce.launch.process_exit import exit_process

SUCCESSOR_P = 0.5  # probability that a token is followed by its fixed successor
ZIPF_S = 1.1  # otherwise a token drawn from a Zipf(s) unigram: learnable within a few steps


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m vpcce.launch.megatron_train_check",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--untied", action="store_true", help="separate output weight (default: tied)")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--rtol", type=float, default=1e-3, help="largest per-step relative difference")
    p.add_argument("--impl", default="auto", help="vpcce impl")
    p.add_argument("--no-rerun", action="store_true",
                   help="skip the second Megatron run that measures run-to-run noise")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--out", default="out/megatron_train_check.json")
    return p.parse_args(argv)


def batches(args, device):
    """The same ``--steps`` batches for both runs: (tokens, labels, loss_mask), [b, s] each."""
    g = torch.Generator().manual_seed(args.seed)
    successor = torch.randperm(args.vocab, generator=g)
    unigram = torch.empty(args.vocab)
    unigram[torch.randperm(args.vocab, generator=g)] = (
        torch.arange(1, args.vocab + 1, dtype=torch.float64).pow(-ZIPF_S).float()
    )
    out = []
    for _ in range(args.steps):
        b, s = args.micro_batch, args.seq_len + 1
        seq = torch.empty(b, s, dtype=torch.long)
        noise = torch.multinomial(unigram, b * s, replacement=True, generator=g).view(b, s)
        seq[:, 0] = noise[:, 0]
        follow = torch.rand(b, s, generator=g) < SUCCESSOR_P
        for t in range(1, s):
            seq[:, t] = torch.where(follow[:, t], successor[seq[:, t - 1]], noise[:, t])
        out.append((seq[:, :-1].to(device), seq[:, 1:].to(device),
                    torch.ones(b, s - 1, device=device)))
    return out


def build_model(args, dtype, device):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
        ffn_hidden_size=4 * args.hidden, hidden_dropout=0.0, attention_dropout=0.0,
        params_dtype=dtype, bf16=dtype == torch.bfloat16, pipeline_dtype=dtype,
        use_cpu_initialization=device.type == "cpu", gradient_accumulation_fusion=False,
    )
    return GPTModel(
        config, get_gpt_layer_local_spec(), vocab_size=args.vocab,
        max_sequence_length=args.seq_len, share_embeddings_and_output_weights=not args.untied,
    )


class _MainGradAdamW:
    """``--device cpu``: torch's AdamW (clipped at 1.0) reading DDP's fp32 ``main_grad``; returns
    ``(True, grad_norm, None)`` from ``step`` like Megatron's optimizers."""

    def __init__(self, params, lr):
        self.params = [p for p in params if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.0)

    def zero_grad(self):
        self.opt.zero_grad(set_to_none=True)

    def step(self):
        for p in self.params:
            p.grad = p.main_grad.to(p.dtype)
        norm = torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        return True, norm, None


def train(args, path: str, data, init_state, device, dtype) -> dict:
    """One run; ``path`` is "megatron" or "megatron_again" (GPTModel's own loss) or "vpcce"
    (``patch(model)``)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from vpcce.integrations.megatron import patch

    torch.manual_seed(args.seed)
    model = build_model(args, dtype, device).to(device)
    if init_state is not None:
        model.load_state_dict(init_state)
    state = {k: v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v
             for k, v in model.state_dict().items()}
    if path == "vpcce":
        patch(model, impl=args.impl)
    wrapped = model
    if dtype != torch.float32:  # as Megatron-LM: every module (norms included) in bf16
        from megatron.core.transformer.module import Float16Module

        wrapped = Float16Module(model.config, model)
    ddp = DistributedDataParallel(
        model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), module=wrapped
    )
    cuda = device.type == "cuda"
    if cuda:
        opt = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=args.lr, weight_decay=0.0, clip_grad=1.0,
                            bf16=dtype == torch.bfloat16, params_dtype=dtype,
                            use_distributed_optimizer=False),
            [ddp],
        )
    else:  # Megatron's optimizers allocate on CUDA: AdamW on DDP's main_grad buffers instead
        opt = _MainGradAdamW(model.parameters(), lr=args.lr)
    s = args.seq_len
    position_ids = torch.arange(s, device=device)[None].expand(args.micro_batch, s)
    causal = torch.ones(1, 1, s, s, dtype=torch.bool, device=device).triu(1)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    losses, grad_norms, step_peaks, run_peaks, step_s = [], [], [], [], []
    t0 = time.perf_counter()
    for tokens, labels, loss_mask in data:
        t_step = time.perf_counter()
        start = torch.cuda.memory_allocated() if cuda else 0
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        ddp.zero_grad_buffer()
        opt.zero_grad()
        per_token = ddp(tokens, position_ids, causal, labels=labels)  # [b, s] fp32
        loss = (per_token * loss_mask).sum() / loss_mask.sum()
        loss.backward()
        if cuda:  # one data-parallel rank: nothing to reduce (and the sync needs CUDA streams)
            ddp.finish_grad_sync()
        _, grad_norm, _ = opt.step()
        losses.append(loss.item())  # waits for the step
        step_s.append(time.perf_counter() - t_step)
        grad_norms.append(float(grad_norm) if grad_norm is not None else math.nan)
        if cuda:
            run_peaks.append(torch.cuda.max_memory_allocated())
            step_peaks.append(run_peaks[-1] - start)
    seconds = time.perf_counter() - t0
    return {
        "losses": losses, "grad_norms": grad_norms, "seconds": seconds, "step_seconds": step_s,
        "peak_bytes": max(run_peaks) if cuda else None,
        "step_peak_bytes": max(step_peaks) if cuda else None,
        "params": sum(p.numel() for p in model.parameters()), "init_state": state,
    }


def _gib(b) -> str:
    return "n/a" if b is None else f"{b / 2**30:.2f} GiB"


def _rel(a: list[float], b: list[float]) -> list[float]:
    return [abs(y - x) / abs(x) for x, y in zip(a, b, strict=True)]


def report(args, runs: dict) -> tuple[str, float]:
    m, v, again = runs["megatron"], runs["vpcce"], runs.get("megatron_again")
    rel = _rel(m["losses"], v["losses"])
    noise = _rel(m["losses"], again["losses"]) if again else None
    lines = [f"{'step':>4} {'megatron loss':>14} {'vpcce loss':>14} {'rel diff':>9}"
             + (f" {'megatron rerun rel diff':>24}" if again else "")]
    for i, (a, b) in enumerate(zip(m["losses"], v["losses"], strict=True)):
        lines.append(f"{i + 1:>4} {a:>14.6f} {b:>14.6f} {rel[i]:>9.2e}"
                     + (f" {noise[i]:>24.2e}" if again else ""))
    median_ms = {k: 1e3 * statistics.median(r["step_seconds"][1:] or r["step_seconds"])
                 for k, r in runs.items()}
    lines += [
        "",
        f"{'':<34}{'megatron':>12}{'vpcce':>12}",
        f"{'peak memory (run, incl. weights)':<34}{_gib(m['peak_bytes']):>12}"
        f"{_gib(v['peak_bytes']):>12}",
        f"{'peak memory above step start':<34}{_gib(m['step_peak_bytes']):>12}"
        f"{_gib(v['step_peak_bytes']):>12}",
        f"{'median step time (after step 1)':<34}{median_ms['megatron']:>10.0f}ms"
        f"{median_ms['vpcce']:>10.0f}ms",
        f"max per-step relative loss difference {max(rel):.2e} (tolerance {args.rtol:.0e}): "
        + ("OK" if max(rel) <= args.rtol else "FAIL"),
    ]
    if again:
        lines.append(f"the same for Megatron's loss run twice (run-to-run noise): {max(noise):.2e}")
    return "\n".join(lines), max(rel)


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron.core import parallel_state, tensor_parallel

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    if device.type == "cuda":
        torch.cuda.set_device(0)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    if device.type == "cuda":
        tensor_parallel.model_parallel_cuda_manual_seed(args.seed)
    data = batches(args, device)
    runs, init = {}, None
    for path in ("megatron", "vpcce", "megatron_again")[: 2 if args.no_rerun else 3]:
        runs[path] = train(args, path, data, init, device, dtype)
        init = runs[path].pop("init_state")
    table, worst = report(args, runs)
    import megatron.core

    print(f"GPTModel {runs['megatron']['params'] / 1e6:.1f}M parameters, V {args.vocab}, "
          f"{args.micro_batch} x {args.seq_len} tokens, TP 1, {dtype}, "
          f"{'untied' if args.untied else 'tied'} embeddings; megatron-core "
          f"{megatron.core.__version__}, torch {torch.__version__}, python "
          f"{platform.python_version()}"
          + (f", {torch.cuda.get_device_name()}" if device.type == "cuda" else ""))
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "runs": runs, "max_rel_diff": worst}, indent=1))
    print(f"wrote {out}")
    parallel_state.destroy_model_parallel()
    return 0 if worst <= args.rtol else 1


if __name__ == "__main__":
    exit_process(main())

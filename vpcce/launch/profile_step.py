"""A few identical steps of the cuBLAS GEMM and vpcce's forward + backward, for Nsight Compute.

    ncu --clock-control none --nvtx --nvtx-include step1/ \\
        --kernel-name regex:'_cce_fwd|nvjet|gemm' --section SpeedOfLight \\
        python -m vpcce.launch.profile_step --forward-only

Each step runs ``e @ c.T`` (the floor), then `vpcce.linear_cross_entropy` forward and backward on
LM-like peaked data (`vpcce.launch.data`), inside an NVTX range ``step<i>``, so ncu can pick a
step after the first, which compiles the Triton kernels (with ``--forward-only``: one GEMM and one
``_cce_fwd_kernel``, ``_cce_fwd_ws_kernel`` on Hopper, per step). The backward launches one
``_cce_dlogits_kernel`` (``_cce_dlogits_ws_kernel``) and cuBLAS GEMMs
per vocabulary chunk from autograd's device thread, outside the NVTX range: pick its kernels with
``--launch-skip``. It prints each step's times (CUDA events; under ncu they include its replays).
"""

from __future__ import annotations

import argparse
import itertools

import torch

import vpcce
from vpcce.launch.data import lm_like


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--d", type=int, default=2304)
    parser.add_argument("--v", type=int, default=256000)
    parser.add_argument("--entropy", type=float, default=5.0)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--filter-eps", type=float, default=None, help="default: exact")
    parser.add_argument("--forward-only", action="store_true", help="no backward (fewer kernels)")
    args = parser.parse_args(argv)
    batch = lm_like(args.n, args.d, args.v, entropy=args.entropy, device="cuda")
    e, c = batch.e.requires_grad_(), batch.c.requires_grad_()
    kwargs = {} if args.filter_eps is None else {"filter_eps": args.filter_eps}
    for step in range(args.steps):
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        torch.cuda.nvtx.range_push(f"step{step}")
        marks[0].record()
        with torch.no_grad():
            e @ c.T
        marks[1].record()
        loss = vpcce.linear_cross_entropy(e, c, batch.targets, **kwargs)
        marks[2].record()
        if not args.forward_only:
            torch.autograd.grad(loss, (e, c))
        marks[3].record()
        torch.cuda.nvtx.range_pop()
        torch.cuda.synchronize()
        gemm, fw, bw = (a.elapsed_time(b) for a, b in itertools.pairwise(marks))
        print(f"step {step}: GEMM {gemm:.2f} ms, vpcce fw {fw:.2f} ms, bw {bw:.2f} ms", flush=True)


if __name__ == "__main__":
    main()

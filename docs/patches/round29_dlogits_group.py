"""Round 29: the dlogits kernel's GROUP (token blocks walked together) on one chunk, in turn
with the cuBLAS GEMM of the same [N, W] output. Usage: N D V W."""
import sys
import torch
from vpcce.kernels import backward_hopper as bh, common
from vpcce.launch.kernel_ab import dlogits_inputs, in_turn, table

n, d, v, w = (int(x) for x in sys.argv[1:5])
x = dlogits_inputs(n, d, v)
fns, outs = {}, {}
for group in (4, 8, 16, 32):
    bh.GROUP = group  # read when the launcher is built
    f = bh.launcher(**x, cfg=common.HOPPER_BACKWARD_BLOCKS, seq_len=n, vocab_start=0,
                    uniform_weight=0.0, logit_scale=1.0, softcap=None)
    dz = torch.empty(n, w, dtype=torch.bfloat16, device="cuda")
    f(0, dz); torch.cuda.synchronize()
    fns[f"GROUP {group}"], outs[group] = (lambda f=f, dz=dz: f(0, dz)), dz
cw, out = x["c"][:w], torch.empty(n, w, dtype=torch.bfloat16, device="cuda")
fns["gemm"] = lambda: torch.mm(x["e2"], cw.T, out=out)
same = all(torch.equal(outs[16], o) for o in outs.values())
times = in_turn(fns, warmup=5)
print(f"N {n} D {d} chunk {w}: dz bitwise equal across GROUP: {same}")
print(table(times, "gemm"))

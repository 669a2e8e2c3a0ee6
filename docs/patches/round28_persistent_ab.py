"""Round 28, final: the persistent dlogits kernel (tree) against round 27's (HEAD copy in
.scratch/bh_old.py) on one chunk, in turn, against the cuBLAS GEMM of the same [N, W] output
(8 launches per timing, sustained); dz compared bitwise. Usage: N D V W [REPS]."""
import importlib.util, sys
import torch
from vpcce.kernels import backward_hopper as bh, common
from vpcce.launch.kernel_ab import dlogits_inputs, in_turn, table

spec = importlib.util.spec_from_file_location("bh_old", ".scratch/bh_old.py")
old = importlib.util.module_from_spec(spec); spec.loader.exec_module(old)
n, d, v, w = (int(x) for x in sys.argv[1:5])
reps = int(sys.argv[5]) if len(sys.argv) > 5 else 12
x = dlogits_inputs(n, d, v)
fns, outs = {}, {}
for name, mod in (("round27", old), ("persistent", bh)):
    f = mod.launcher(**x, cfg=common.HOPPER_BACKWARD_BLOCKS, seq_len=n, vocab_start=0,
                     uniform_weight=0.0, logit_scale=1.0, softcap=None)
    dz = torch.empty(n, w, dtype=torch.bfloat16, device="cuda")
    f(0, dz); torch.cuda.synchronize()
    fns[name], outs[name] = (lambda f=f, dz=dz: f(0, dz)), dz
cw, out = x["c"][:w], torch.empty(n, w, dtype=torch.bfloat16, device="cuda")
fns["gemm"] = lambda: torch.mm(x["e2"], cw.T, out=out)
same = torch.equal(outs["round27"], outs["persistent"])
times = in_turn(fns, reps=reps, warmup=5)
print(f"N {n} D {d} chunk {w}: dz bitwise equal: {same}")
print(table(times, "gemm"))

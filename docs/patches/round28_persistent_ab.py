"""Round 28, final: the persistent dlogits kernel (tree) against round 27's (HEAD copy in
.scratch/bh_old.py) on one chunk, in turn, against the cuBLAS GEMM of the same [N, W] output
(8 launches per timing, sustained); dz compared bitwise."""
import dataclasses, importlib.util, statistics, sys
import torch
from vpcce.kernels import backward_hopper as bh, common
from vpcce.launch.data import lm_like

spec = importlib.util.spec_from_file_location("bh_old", ".scratch/bh_old.py")
old = importlib.util.module_from_spec(spec); spec.loader.exec_module(old)
n, d, v, w = (int(x) for x in sys.argv[1:5])
reps = int(sys.argv[5]) if len(sys.argv) > 5 else 12
b = lm_like(n, d, v, entropy=5.0, dtype=torch.bfloat16, device="cuda")
e2, c = b.e, b.c
y2 = b.targets.reshape(1, n)
with torch.no_grad():
    lse = torch.cat([torch.logsumexp((e2[i:i + 2048] @ c.T).float(), 1) for i in range(0, n, 2048)])
g = torch.full((n,), 1.0 / n, device="cuda")
dzt = torch.zeros(n, device="cuda")
cfg = common.HOPPER_BACKWARD_BLOCKS
fns, outs = {}, {}
for name, mod in (("round27", old), ("persistent", bh)):
    f = mod.launcher(e2, c, y2, lse, g, None, dzt, cfg, seq_len=n, vocab_start=0,
                     uniform_weight=0.0, logit_scale=1.0, softcap=None)
    dz = torch.empty(n, w, dtype=torch.bfloat16, device="cuda")
    f(0, dz); torch.cuda.synchronize()
    fns[name], outs[name] = (lambda f=f, dz=dz: f(0, dz)), dz
cw = c[:w]
out = torch.empty(n, w, dtype=torch.bfloat16, device="cuda")
fns["gemm"] = lambda: torch.mm(e2, cw.T, out=out)
same = torch.equal(outs["round27"], outs["persistent"])
ms = {k: [] for k in fns}
for f in fns.values():
    for _ in range(5): f()
for rep in range(reps):
    for name, f in fns.items():
        s, t = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(8): f()
        t.record(); t.synchronize()
        ms[name].append(s.elapsed_time(t) / 8)
med = {k: statistics.median(x) for k, x in ms.items()}
print(f"N {n} D {d} chunk {w}: dz bitwise equal: {same}")
print("| kernel | median ms per chunk | / GEMM | min | max |")
print("|---|---|---|---|---|")
for k in fns:
    print(f"| {k} | {med[k]:.3f} | {med[k] / med['gemm']:.3f} | {min(ms[k]):.3f} | {max(ms[k]):.3f} |")

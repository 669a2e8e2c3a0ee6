"""Round 29: the dlogits kernel's GROUP (token blocks walked together) on one chunk,
in turn with the cuBLAS GEMM of the same [N, W] output. Usage: N D V W."""
import statistics, sys
import torch
from vpcce.kernels import backward_hopper as bh, common
from vpcce.launch.data import lm_like

n, d, v, w = (int(x) for x in sys.argv[1:5])
b = lm_like(n, d, v, entropy=5.0, dtype=torch.bfloat16, device="cuda")
e2, c = b.e, b.c
y2 = b.targets.reshape(1, n)
with torch.no_grad():
    lse = torch.cat([torch.logsumexp((e2[i:i + 2048] @ c.T).float(), 1) for i in range(0, n, 2048)])
g = torch.full((n,), 1.0 / n, device="cuda")
dzt = torch.zeros(n, device="cuda")
cfg = common.HOPPER_BACKWARD_BLOCKS
fns, outs = {}, {}
for group in (4, 8, 16, 32):
    bh.GROUP = group
    f = bh.launcher(e2, c, y2, lse, g, None, dzt, cfg, seq_len=n, vocab_start=0,
                    uniform_weight=0.0, logit_scale=1.0, softcap=None)
    dz = torch.empty(n, w, dtype=torch.bfloat16, device="cuda")
    f(0, dz); torch.cuda.synchronize()
    fns[f"GROUP {group}"], outs[group] = (lambda f=f, dz=dz: f(0, dz)), dz
cw = c[:w]
out = torch.empty(n, w, dtype=torch.bfloat16, device="cuda")
fns["gemm"] = lambda: torch.mm(e2, cw.T, out=out)
same = all(torch.equal(outs[16], o) for o in outs.values())
ms = {k: [] for k in fns}
for f in fns.values():
    for _ in range(5): f()
for rep in range(12):
    for name, f in fns.items():
        s, t = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(8): f()
        t.record(); t.synchronize()
        ms[name].append(s.elapsed_time(t) / 8)
med = {k: statistics.median(x) for k, x in ms.items()}
print(f"N {n} D {d} chunk {w}: dz bitwise equal across GROUP: {same}")
for k in fns:
    print(f"| {k} | {med[k]:.3f} | {med[k] / med['gemm']:.3f} |")

"""Round 27: the Hopper dlogits kernel, cooperative (128 x 256 tiles shared by both warpgroups)
against ping-pong (each warpgroup every other 128 x 128 tile), in the exact fw+bw.
In turn per repetition, 250 ms idle before each op: GEMM, exact fw+bw per variant; then one
profiled step per variant (per-kernel GPU ms); gradients compared bitwise with the cooperative."""
import statistics, sys, time, json
import torch
from vpcce import linear_cross_entropy
from vpcce.kernels import backward_hopper as bh
from vpcce.launch.data import lm_like

n, d, v = (int(x) for x in sys.argv[1:4])
reps = int(sys.argv[4]) if len(sys.argv) > 4 else 6
out_json = sys.argv[5] if len(sys.argv) > 5 else None
variants = {"coop": (False, 5), "pp5": (True, 5), "pp4": (True, 4)}
b = lm_like(n, d, v, entropy=5.0, dtype=torch.bfloat16, device="cuda")
e = b.e.detach().requires_grad_(); c = b.c.detach().requires_grad_(); y = b.targets

def fwbw(pp, stages):
    def run():
        bh.PINGPONG, bh.PINGPONG_STAGES = pp, stages
        loss = linear_cross_entropy(e, c, y, filter_eps=None)
        return torch.autograd.grad(loss, (e, c))
    return run

ops = {"gemm": lambda: b.e @ b.c.T, **{k: fwbw(*a) for k, a in variants.items()}}
for _ in range(2):
    for op in ops.values(): op()
torch.cuda.synchronize()
ref = ops["coop"]()
same = {}
for k in variants:
    if k == "coop": continue
    alt = ops[k]()
    same[k] = [(torch.equal(a, r), ((a.float() - r.float()).norm() / r.float().norm()).item()) for a, r in zip(alt, ref)]
    del alt
del ref
ms = {k: [] for k in ops}
for rep in range(reps):
    for name, op in ops.items():
        torch.cuda.synchronize(); time.sleep(0.25)
        s, t = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); op(); t.record(); t.synchronize()
        ms[name].append(s.elapsed_time(t))
med = {k: statistics.median(x) for k, x in ms.items()}
ratio = {k: statistics.median(a / (4 * g) for a, g in zip(ms[k], ms["gemm"])) for k in variants}
prof = {}
from torch.profiler import profile, ProfilerActivity
for name in variants:
    torch.cuda.synchronize(); time.sleep(0.25)
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        ops[name](); torch.cuda.synchronize()
    agg = {}
    for ev in p.key_averages():
        t_ = getattr(ev, "self_device_time_total", 0) / 1e3
        if t_:
            agg[ev.key[:50]] = (t_, ev.count)
    prof[name] = sorted(agg.items(), key=lambda kv: -kv[1][0])[:6]
print(f"N {n} D {d} V {v}; vs coop (bitwise equal, rel diff) dE, dC: {same}")
for name in variants:
    print(f"--- {name}: top kernels (ms, calls)")
    for k, (t_, cnt) in prof[name]:
        print(f"  {t_:8.2f} {cnt:4d}  {k}")
print("| op | median ms | / 4 GEMM |")
print("|---|---|---|")
print(f"| GEMM | {med['gemm']:.2f} | |")
for k in variants:
    print(f"| exact fw+bw, {k} | {med[k]:.2f} | {ratio[k]:.3f} |")
if out_json:
    json.dump(dict(n=n, d=d, v=v, ms=ms, median=med, ratio=ratio, same=same, prof=prof), open(out_json, "w"), indent=1)

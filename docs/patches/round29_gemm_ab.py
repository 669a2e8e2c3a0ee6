"""Round 29: a persistent tile-skipping Hopper GEMM with a TMA-reduce epilogue (not kept) against
round 28's and cuBLAS, on the backward's product shapes, in turn (8 launches per timing,
sustained, median of REPS). Usage: N D W [W ...].

To rerun: `git show HEAD:vpcce/kernels/matmul_hopper.py > .scratch/mh_old.py`, then
`git apply docs/patches/round29_matmul_reduce.patch` (the tried kernel becomes the tree's)."""
import importlib.util, sys
import torch
from vpcce.kernels import matmul_hopper as new
from vpcce.launch.kernel_ab import in_turn, medians

spec = importlib.util.spec_from_file_location("mh_old", ".scratch/mh_old.py")
old = importlib.util.module_from_spec(spec); spec.loader.exec_module(old)
n, d, *widths = (int(x) for x in sys.argv[1:])
REPS = 12
g = torch.Generator(device="cuda").manual_seed(0)


def timed(fns):
    return medians(in_turn(fns, reps=REPS))


def one_tile(f):
    """The tree's kernel on a grid of one program per output tile (not persistent)."""
    sms = new._sms
    new._sms = lambda device: 2**30
    try:
        f()
    finally:
        new._sms = sms


def rel(x, want):
    return ((x.double() - want).norm() / want.norm()).item()


e = (torch.randn(n, d, device="cuda", generator=g) * 0.5).to(torch.bfloat16)
for w in widths:
    dz = (torch.randn(n, w, device="cuda", generator=g) * 1e-3).to(torch.bfloat16)
    c = torch.randn(w, d, device="cuda", generator=g).to(torch.bfloat16)
    zero = torch.zeros(-(-n // 128), -(-w // 256), dtype=torch.int8, device="cuda")
    half = (torch.rand(zero.shape, device="cuda", generator=g) < 0.5).to(torch.int8)
    start = torch.randn(n, d, device="cuda", generator=g)
    split = n // 2 // 128 * 128
    # dE: acc += dz @ c into fp32, whole and as the scratch's two parts
    accs = {k: start.clone() for k in ("old", "new", "cublas", "old2", "new2", "cublas2")}
    parts = {k: (accs[k][:split], accs[k][split:].clone()) for k in ("old2", "new2", "cublas2")}
    bf = torch.empty(n, d, dtype=torch.bfloat16, device="cuda")
    fns = {
        "dE cuBLAS bf16 out (floor)": lambda: torch.mm(dz, c, out=bf),
        "dE cuBLAS addmm fp32": lambda: torch.addmm(accs["cublas"], dz, c, out_dtype=torch.float32, out=accs["cublas"]),
        "dE old (dense)": lambda: old.launch(dz, c, accs["old"], zero, (128, 256), add=True),
        "dE new (dense)": lambda: new.launch(dz, c, accs["new"], zero, (128, 256), add=True),
        "dE 2 parts cuBLAS x2": lambda: [torch.addmm(p, dz[s], c, out_dtype=torch.float32, out=p) for p, s in ((parts["cublas2"][0], slice(0, split)), (parts["cublas2"][1], slice(split, None)))],
        "dE 2 parts old": lambda: old.launch(dz, c, parts["old2"][0], zero, (128, 256), add=True, rest=(split, parts["old2"][1])),
        "dE 2 parts new": lambda: new.launch(dz, c, parts["new2"][0], zero, (128, 256), add=True, rest=(split, parts["new2"][1])),
        "dE old (half kept)": lambda: old.launch(dz, c, accs["old"], half, (128, 256), add=True),
        "dE new (half kept)": lambda: new.launch(dz, c, accs["new"], half, (128, 256), add=True),
        "dE new, one tile per program (dense)": lambda: one_tile(lambda: new.launch(dz, c, accs["new"], zero, (128, 256), add=True)),
        "dE new, one tile per program (half kept)": lambda: one_tile(lambda: new.launch(dz, c, accs["new"], half, (128, 256), add=True)),
    }
    med = timed(fns)
    # accuracy of one product from `start`, against fp64
    want = dz.double() @ c.double() + start.double()
    errs = {}
    for k, f in (("old", lambda o: old.launch(dz, c, o, zero, (128, 256), add=True)),
                 ("new", lambda o: new.launch(dz, c, o, zero, (128, 256), add=True)),
                 ("cublas", lambda o: torch.addmm(o, dz, c, out_dtype=torch.float32, out=o))):
        o = start.clone(); f(o); errs[k] = rel(o - start, want - start.double())
    o1, o2 = start.clone(), start.clone()
    new.launch(dz, c, o1, zero, (128, 256), add=True); new.launch(dz, c, o2, zero, (128, 256), add=True)
    repro = torch.equal(o1, o2)
    # dC = dz^T @ e into bf16
    dc = {k: torch.empty(w, d, dtype=torch.bfloat16, device="cuda") for k in ("old", "new", "cublas")}
    zt = torch.zeros(-(-w // 256), -(-n // 128), dtype=torch.int8, device="cuda")
    fns_c = {
        "dC cuBLAS": lambda: torch.mm(dz.t(), e, out=dc["cublas"]),
        "dC old (dense)": lambda: old.launch(dz.t(), e, dc["old"], zt, (256, 128), add=False),
        "dC new (dense)": lambda: new.launch(dz.t(), e, dc["new"], zt, (256, 128), add=False),
    }
    med.update(timed(fns_c))
    same_c = torch.equal(dc["old"], dc["new"])
    floor = med["dE cuBLAS bf16 out (floor)"]
    print(f"\n### N {n} D {d} W {w}: dE error vs fp64 (one product) old {errs['old']:.2e} new {errs['new']:.2e} cuBLAS {errs['cublas']:.2e}; new reproducible {repro}; dC old == new bitwise {same_c}")
    print("| product | median ms | / cuBLAS bf16-out GEMM of the shape |")
    print("|---|---|---|")
    for k, v in med.items():
        ref = med["dC cuBLAS"] if k.startswith("dC") else floor
        print(f"| {k} | {v:.3f} | {v / ref:.3f} |")

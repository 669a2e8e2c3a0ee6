"""Round 29: vpcce.launch.ratio with dense dE products through the Gluon GEMM.
VARIANT=stock | parts (the scratch's two parts in one Gluon call) | all (every dense dE product)
| last (the scratch's rows last: grad_e.NARROW_PRODUCT = 0) | oldgemm (the tile-skipping GEMM
from .scratch/mh_old.py, for the tree with docs/patches/round29_matmul_reduce.patch applied).
Arguments: vpcce.launch.ratio's."""
import os, runpy, sys
import torch
from vpcce.kernels import grad_e

VARIANT = os.environ.get("VARIANT", "stock")
_add = grad_e.EGradAccumulator.add
_zeros = {}


def add(self, dz_chunk, c_chunk, *, skip, skip_tile, blocks, gemm):
    if skip is None and dz_chunk.is_cuda and (VARIANT == "all" or (VARIANT == "parts" and len(self.parts) == 2)):
        shape = (-(-dz_chunk.shape[0] // skip_tile[0]), -(-dz_chunk.shape[1] // skip_tile[1]))
        if shape not in _zeros:
            _zeros[shape] = torch.zeros(shape, dtype=torch.int8, device=dz_chunk.device)
        skip = _zeros[shape]
    return _add(self, dz_chunk, c_chunk, skip=skip, skip_tile=skip_tile, blocks=blocks, gemm=gemm)


grad_e.EGradAccumulator.add = add
if VARIANT == "last":  # the scratch's rows last at every head (as up to round 17)
    grad_e.NARROW_PRODUCT = 0
if VARIANT == "oldgemm":  # round 28's tile-skipping GEMM
    import importlib.util
    import vpcce.kernels
    spec = importlib.util.spec_from_file_location("vpcce.kernels.matmul_hopper", ".scratch/mh_old.py")
    old = importlib.util.module_from_spec(spec); spec.loader.exec_module(old)
    sys.modules["vpcce.kernels.matmul_hopper"] = old
    vpcce.kernels.matmul_hopper = old
sys.argv = ["ratio", *sys.argv[1:]]
runpy.run_module("vpcce.launch.ratio", run_name="__main__")

"""Test setup: run the Triton kernels in the interpreter when no GPU is present.

TRITON_INTERPRET must be set before anything imports triton, so it is set here at the top.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)


@pytest.fixture
def hopper():
    """Skip unless a Hopper GPU is present and this Triton's Gluon API is one the warp-specialized
    kernels were validated with (`vpcce.kernels.forward_hopper.gluon_validated`)."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("needs a Hopper GPU")
    from vpcce.kernels import forward_hopper

    if not forward_hopper.gluon_validated():
        pytest.skip("the Gluon kernels are off on this Triton")

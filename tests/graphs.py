"""CUDA-graph capture of a training step, as the CUDA tests do it."""

import torch


def capture(train_step, warmup: int = 3):
    """``(graph, outputs)``: ``train_step()`` captured in a ``torch.cuda.CUDAGraph``.

    It runs ``warmup`` times first on a side stream (Triton compiles and autotunes there, not
    during capture); the capture runs in sync debug mode "error", so a host synchronization
    inside the step raises.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            train_step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.graph(graph):
            outputs = train_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return graph, outputs

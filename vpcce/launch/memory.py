"""Peak extra memory of a training step and of a region inside it (the loss op), on CPU and CUDA.

Definition (both devices): the most bytes of tensor storage that were alive at once during the
region, counting only storages created inside it — activations, saved tensors, workspaces and the
gradients the region produces — and not the parameters, optimizer state or inputs that existed
before it. Gradients from the previous step are freed first (``zero_grad(set_to_none=True)``).

- CUDA: ``torch.cuda.max_memory_allocated`` minus ``memory_allocated`` at the region's start (the
  caching allocator's view, so allocations are rounded up to its 512-byte blocks).
- CPU has no allocator statistics, so `LiveBytes` watches every ATen call below autograd (forward
  and backward) with a ``TorchDispatchMode``: each output storage that is new (shared with no input
  and not seen before) is counted once by its ``nbytes``, and a ``weakref.finalize`` subtracts it
  when the storage dies. Views and in-place results are never counted twice.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

MEMORY_DEFINITION = (
    "peak bytes of tensor storage alive at once during the region, counting only storages created "
    "inside it (activations, saved tensors, workspaces, the gradients it produces); CUDA: "
    "max_memory_allocated - memory_allocated at the region's start; CPU: a TorchDispatchMode "
    "counting live storages. 'step': forward + backward of a training step (previous gradients "
    "freed); 'loss op': the LM head + loss forward and backward alone"
)


def _storages(tree, out: list | None = None) -> list[torch.UntypedStorage]:
    """Storages of the tensors in nested tuples / lists / dicts (ATen arguments and results)."""
    out = [] if out is None else out
    if isinstance(tree, torch.Tensor):
        out.append(tree.untyped_storage())
    elif isinstance(tree, (tuple, list)):
        for x in tree:
            _storages(x, out)
    elif isinstance(tree, dict):
        for x in tree.values():
            _storages(x, out)
    return out


class LiveBytes(TorchDispatchMode):
    """``live``: bytes of storages created inside the mode and still alive; ``peak``: their max."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()  # data_ptrs of counted storages that are still alive
        self._finalizers: list[weakref.finalize] = []

    def _release(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {s.data_ptr() for s in _storages((args, kwargs))}
        for storage in _storages(out):
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or key in inputs or key in self._seen:
                continue
            self._seen.add(key)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            self._finalizers.append(weakref.finalize(storage, self._release, key, nbytes))
        return out

    def __exit__(self, *exc):
        # storages that outlive the region (gradients) stop being tracked here
        for fin in self._finalizers:
            fin.detach()
        return super().__exit__(*exc)


class MemoryMeter:
    """``with meter: ...`` measures a step; ``with meter.window(): ...`` inside it measures a part.

    After the step: ``step_peak`` and ``window_peak`` in bytes (``window_peak`` is None if no
    window was opened).
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.step_peak = 0
        self.window_peak: int | None = None
        self._mode: LiveBytes | None = None

    def __enter__(self):
        self.window_peak = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self._peak_before_window = 0
        else:
            self._mode = LiveBytes().__enter__()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = max(self._peak_before_window, torch.cuda.max_memory_allocated(self.device))
            self.step_peak = peak - self._base
        else:
            self._mode.__exit__(*exc)
            self.step_peak = self._mode.peak
            self._mode = None
        return False

    @contextlib.contextmanager
    def window(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._peak_before_window = max(
                self._peak_before_window, torch.cuda.max_memory_allocated(self.device)
            )
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            yield
            torch.cuda.synchronize(self.device)
            self.window_peak = torch.cuda.max_memory_allocated(self.device) - base
        else:
            mode = self._mode
            base, outer_peak = mode.live, mode.peak
            mode.peak = base
            yield
            self.window_peak = mode.peak - base
            mode.peak = max(outer_peak, mode.peak)


class NoMeter:
    """`MemoryMeter`'s interface, measuring nothing (steps between measured ones on CPU, where the
    dispatch-mode tracker costs time)."""

    step_peak = None
    window_peak = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def window(self):
        return contextlib.nullcontext()

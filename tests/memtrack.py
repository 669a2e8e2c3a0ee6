"""CPU peak-memory tracker for tests: the peak of live tensor bytes allocated inside a region.

CPU has no allocator statistics like ``torch.cuda.max_memory_allocated``, so `MemTracker` watches
every ATen call below autograd (forward and backward) with a ``TorchDispatchMode``. Each output
whose storage is new (shared with no input and not seen before) is counted once, by its storage's
``nbytes``, and a ``weakref.finalize`` on the storage subtracts it when the storage dies. Views,
in-place ops and storages that existed before the region are never counted.

    with MemTracker() as mem:
        loss = f(x); loss.backward()
    mem.peak  # bytes
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _storages(tree) -> list[torch.UntypedStorage]:
    leaves, _ = tree_flatten(tree)
    return [x.untyped_storage() for x in leaves if isinstance(x, torch.Tensor)]


class MemTracker(TorchDispatchMode):
    """Tracks ``live`` bytes of storages created inside the ``with`` block and their ``peak``."""

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
        # Storages that outlive the region (outputs, gradients) stop being tracked here.
        for fin in self._finalizers:
            fin.detach()
        return super().__exit__(*exc)

"""CPU peak-memory tracker for tests: the library's live-storage counter under the tests' name.

    with MemTracker() as mem:
        loss = f(x); loss.backward()
    mem.peak  # bytes

`vpcce.launch.memory.LiveBytes` counts every storage created inside the region once (views,
in-place results and storages from before the region never) and subtracts it when it dies.
"""

from vpcce.launch.memory import LiveBytes as MemTracker

__all__ = ["MemTracker"]

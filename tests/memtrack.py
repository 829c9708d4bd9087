"""Peak bytes of tensor storage allocated inside a region (CPU has no allocator stats).

A TorchDispatchMode sees every aten op's outputs; a storage allocated in the region is
counted from its first appearance until the last tensor that points at it dies.
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class PeakLiveBytes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live: dict[int, list] = {}  # storage address -> [bytes, live tensors]
        self.current = 0
        self.peak = 0
        self.seen_inputs: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for t in tree_flatten((args, kwargs))[0]:
            if isinstance(t, torch.Tensor):
                address = t.untyped_storage().data_ptr()
                if address not in self.live:  # made before the region: not ours
                    self.seen_inputs.add(address)
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        address = storage.data_ptr()
        if address in self.seen_inputs or address == 0:
            return
        entry = self.live.get(address)
        if entry is None:
            entry = self.live[address] = [storage.nbytes(), 0]
            self.current += entry[0]
            self.peak = max(self.peak, self.current)
        entry[1] += 1
        weakref.finalize(t, self._release, address)

    def _release(self, address: int) -> None:
        entry = self.live.get(address)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[address]

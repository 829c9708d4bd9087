"""Peak bytes of tensor storage allocated inside a region, for CPU (no allocator stats).

A TorchDispatchMode sees every aten op's outputs. A storage first seen as an output inside
the region counts from then until the storage itself is freed (a weak reference to the
storage, so tensors autograd saves for backward stay counted). Storage made before the
region (inputs, weights) is not counted; scratch memory an op uses without returning it
is invisible, so on CPU this is a slight lower bound. CUDA uses the allocator's peak.
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode


def _storages(tree) -> Iterator:
    """Storages of the tensors in nested tuples / lists / dicts (aten arguments and
    results; cheaper than a general pytree flatten, which is called per op)."""
    if isinstance(tree, torch.Tensor):
        if tree.device.type != "meta":
            storage = tree.untyped_storage()
            if storage.data_ptr() != 0:
                yield storage
    elif isinstance(tree, (tuple, list)):
        for item in tree:
            yield from _storages(item)
    elif isinstance(tree, dict):
        for item in tree.values():
            yield from _storages(item)


def _custom_op_body(func) -> Optional[Callable]:
    """The Python function behind a sasa_triton custom op, else None."""
    if getattr(func, "namespace", None) != "sasa_triton":
        return None
    from sasa_triton.ops import custom_op_body

    return custom_op_body(func.__name__.split(".")[0])


class PeakLiveBytes(TorchDispatchMode):
    """`with PeakLiveBytes() as m: ...`, then m.peak (bytes)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple] = {}  # storage address -> (weak ref, bytes)
        self.before: set[int] = set()  # storages that existed before the region
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for storage in _storages((args, kwargs)):
            if storage.data_ptr() not in self.live:
                self.before.add(storage.data_ptr())
        body = _custom_op_body(func)
        if body is not None:
            # attend's custom ops would be one opaque call: run their Python body with
            # this mode active, so the allocations inside are seen too
            with self:
                out = body(*args, **(kwargs or {}))
        else:
            out = func(*args, **(kwargs or {}))
        for storage in _storages(out):
            address = storage.data_ptr()
            if address in self.live and self.live[address][0].expired():
                self.current -= self.live.pop(address)[1]  # freed, address reused
            if address not in self.live and address not in self.before:
                self.live[address] = (StorageWeakRef(storage), storage.nbytes())
                self.current += storage.nbytes()
                if self.current > self.peak:
                    # current counts freed storage until swept: sweep only when it
                    # would set a new peak (sweeping every op costs O(ops x live))
                    self._sweep()
                    self.peak = max(self.peak, self.current)
        return out

    def _sweep(self) -> None:
        for address in [a for a, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(address)[1]

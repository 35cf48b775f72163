"""Count the memory a block of PyTorch work holds in tensors, op by op, on real or fake tensors.

`TensorMemory` is a dispatch mode that adds the bytes of every tensor storage an op creates and takes them off when
the storage is freed, so its `peak` is the largest number of bytes held in tensors at once: what a GPU's caching
allocator reports as `torch.cuda.max_memory_allocated()` for the same ops, less its rounding of each block. It
counts the same way as `torch.distributed._tools.mem_tracker.MemTracker` (its tests compare the two byte for byte),
which cannot serve here: it installs a gradient hook on every parameter of a module it enters, frozen ones too, and
a frozen parameter refuses hooks.

Run under `torch._subclasses.fake_tensor.FakeTensorMode`, the ops compute nothing and hold no memory, so the peak of
a training step of any size can be counted on a small machine (`fake_tensors`).
"""
from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from fcdiffusion.core.frequency import clear_caches


class TensorMemory(TorchDispatchMode):
    """Bytes held in tensor storages: those of `tensors` given at the start (counted once per storage) and every
    storage an op creates while the mode is active, until it is freed."""

    def __init__(self, tensors: Iterable[torch.Tensor] = ()):
        super().__init__()
        self._seen: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.current = 0
        self.peak = 0
        for tensor in tensors:
            self.add(tensor)

    def add(self, tensor: Any) -> None:
        """Count `tensor`'s storage if it is new (a view of a counted storage adds nothing)."""
        if not isinstance(tensor, torch.Tensor):
            return
        storage = tensor.untyped_storage()
        if storage in self._seen:
            return
        size = storage.nbytes()
        self._seen[storage] = size
        weakref.finalize(storage, self._release, size)
        self.current += size
        self.peak = max(self.peak, self.current)

    def _release(self, size: int) -> None:
        self.current -= size

    def reset_peak(self) -> int:
        """Forget the peak; returns the bytes held now."""
        self.peak = self.current
        return self.current

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            self.add(tensor)
        return out


@contextlib.contextmanager
def fake_tensors() -> Iterator[FakeTensorMode]:
    """Tensors made inside are fake: shapes, dtypes and devices without memory or compute. Real tensors made
    before may take part (they are treated as constants); the frequency module's cached tensors are dropped on the
    way in and out, so that fake work makes (and counts) its own and real work never meets a fake one. Data
    pointers of fake tensors, which a cache of the text encoder's output reads as a key, are all alike, which only
    merges such caches."""
    clear_caches()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")
            with FakeTensorMode(allow_non_fake_inputs=True) as mode:
                yield mode
    finally:
        clear_caches()


def real(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` run with fake tensors switched off, for work that needs real values (numpy, `.item()`): its results
    are real tensors that fake ones may use."""
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with unset_fake_temporarily():
            return fn(*args, **kwargs)

    return wrapped

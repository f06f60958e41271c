"""Exact accounting of live tensor memory, for tests, benchmarks and examples.

:class:`LiveTensorBytes` is a ``TorchDispatchMode`` that records each tensor storage an operator
creates, with its exact ``nbytes``, and forgets it when the storage is freed (a weakref finalizer on
the storage). ``live`` is the sum now, ``peak`` its maximum. Views share their storage and count once.
This is what a perfect allocator would need: no caching, fragmentation, block rounding, CUDA
context or library workspaces. It works on any device, and with ``FakeTensorMode`` (shapes and
lifetimes without data), where ``fake_scalars=True`` answers ``.item()``/``bool()`` with 1/True.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["LiveTensorBytes"]


class LiveTensorBytes(TorchDispatchMode):
    """Live and peak bytes of tensor storages (see the module docstring).

    Example:
      >>> import torch
      >>> from flora_lab.livebytes import LiveTensorBytes
      >>> with LiveTensorBytes() as tracker:
      ...     x = torch.zeros(1000)
      ...     y = x * 2
      ...     del y
      >>> tracker.live, tracker.peak
      (4000, 8000)
    """

    def __init__(self, fake_scalars: bool = False):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}
        self._fake_scalars = fake_scalars

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self._fake_scalars and func is torch.ops.aten._local_scalar_dense.default:
            value = args[0]
            if value.dtype == torch.bool:
                return True
            return 1.0 if value.is_floating_point() else 1
        out = func(*args, **(kwargs or {}))
        for value in pytree.tree_leaves(out):
            if isinstance(value, torch.Tensor):
                self._track(value)
        return out

    def track(self, tensors: Iterable[torch.Tensor]) -> None:
        """Count tensors created before the mode was entered (parameters, optimizer state, ...)."""
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor):
                self._track(tensor)

    def _track(self, tensor: torch.Tensor) -> None:
        if tensor.device.type == "meta":  # no storage behind it
            return
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self._sizes:
            return
        size = storage.nbytes()
        self._sizes[key] = size
        self.live += size
        if self.live > self.peak:
            self.peak = self.live
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def reset_peak(self) -> None:
        """Start a new peak from the bytes live now."""
        self.peak = self.live

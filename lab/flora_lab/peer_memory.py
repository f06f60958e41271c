"""State bytes of the peers, and the exact count of the bytes a live optimizer holds.

The library's estimator (:mod:`flora_opt.memory`, ``flora-opt memory``) knows the state of
Flora, AdamW and Adafactor. The benchmarks and the demo also compare 8-bit AdamW, GaLore and
APOLLO; their formulas live here, over the same :class:`flora_opt.memory.ParamInfo` records, so
:func:`method_state_bytes` answers for every name of :data:`METHODS` (the names of
:mod:`flora_lab.contenders`). ``lab/tests/test_peer_memory.py`` checks each formula against
:func:`optimizer_state_bytes` after real steps of the library that defines the optimizer.

Formulas per parameter (``m x n`` matrix view, ``N`` elements, ``s`` bytes per parameter
element, ``r`` the rank):

==========================  =====================================================================
optimizer                   state bytes
==========================  =====================================================================
AdamW 8-bit (torchao)       per moment: ``N + 4 N/256 + 1024`` (codes, scales, own qmap) if
                            ``N >= 4096`` and ``256 | N``, else ``N s``; + 4 (0-d step)
AdamW 8-bit (bitsandbytes)  per moment: ``N + 4 ceil(N/256)`` if ``N >= 4096``, else ``4 N``;
                            + 2 x 1024 for the two code books shared by all tensors
GaLore (``GaLoreAdamW``)    block matrices: ``s r' (min(m, n) + 2 max(m, n))``, ``r' = min(r,
                            min(m, n))`` (SVD projector + Adam moments of the projected gradient);
                            other tensors AdamW ``2 N s``
APOLLO (``APOLLOAdamW``)    block matrices: ``s r (min(m, n) + 2 max(m, n)) + 4`` (random
                            projector kept in state, moments, 0-d norm); other tensors ``2 N s``
==========================  =====================================================================

GaLore and APOLLO project the 2-D weights of the transformer blocks only (their training
scripts' convention, as ``benchmarks/peers`` and :func:`flora_lab.contenders.split_lowrank`): a
parameter is a *block matrix* when it is 2-D, is not an embedding, is not the output head, and
its name has an integer component (``...layers.3...``), :func:`is_block_matrix_name`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

from flora_opt import memory
from flora_opt.memory import ParamInfo

__all__ = [
    "METHODS",
    "PEER_METHODS",
    "is_block_matrix",
    "is_block_matrix_name",
    "method_state_bytes",
    "optimizer_state_bytes",
    "optimizer_state_tensors",
    "storage_key",
]

#: The peers' formulas of this module, by contender name.
PEER_METHODS = ("adamw8bit_torchao", "adamw8bit_bnb", "galore", "apollo")

#: Every name :func:`method_state_bytes` knows, in table order.
METHODS = (
    "adamw",
    "adamw8bit_torchao",
    "adamw8bit_bnb",
    "adafactor",
    "adafactor_momentum",
    "galore",
    "apollo",
    "flora",
    "flora_8bit",
)

_BLOCK_RE = re.compile(r"(^|\.)\d+\.")


def is_block_matrix_name(name: str, ndim: int) -> bool:
    """GaLore/APOLLO convention: 2-D, not named like an embedding or the output head, and an
    integer component in the qualified name (a transformer-block matrix)."""
    lowered = name.lower()
    if ndim != 2 or "emb" in lowered or "lm_head" in lowered:
        return False
    return bool(_BLOCK_RE.search(name))


def is_block_matrix(p: ParamInfo) -> bool:
    """:func:`is_block_matrix_name` for a parameter record (an ``nn.Embedding`` weight never is)."""
    return not p.embedding and is_block_matrix_name(p.name, len(p.shape))


def _adamw8bit_torchao(p: ParamInfo, rank) -> int:
    n = p.numel
    if n >= 4096 and n % 256 == 0:
        return 2 * (n + 4 * (n // 256) + 1024) + 4
    return 2 * n * p.itemsize + 4


def _adamw8bit_bnb(p: ParamInfo, rank) -> int:
    n = p.numel
    if n >= 4096:
        return 2 * (n + 4 * math.ceil(n / 256))
    return 2 * 4 * n


def _galore(p: ParamInfo, rank: int) -> int:
    if not is_block_matrix(p):
        return 2 * p.numel * p.itemsize
    m, n = p.shape
    r = min(rank, m, n)
    return p.itemsize * r * (min(m, n) + 2 * max(m, n))


def _apollo(p: ParamInfo, rank: int) -> int:
    if not is_block_matrix(p):
        return 2 * p.numel * p.itemsize
    m, n = p.shape
    return p.itemsize * rank * (min(m, n) + 2 * max(m, n)) + 4


_FORMULAS = {
    "adamw8bit_torchao": _adamw8bit_torchao,
    "adamw8bit_bnb": _adamw8bit_bnb,
    "galore": _galore,
    "apollo": _apollo,
}


def method_state_bytes(method: str, params: Iterable[ParamInfo], rank: int | None = 256) -> int:
    """Exact optimizer-state bytes of ``method`` (one of :data:`METHODS`) for ``params``: the
    library's formula (:func:`flora_opt.memory.method_state_bytes`) for its methods, this
    module's for the peers. GaLore and APOLLO need an int ``rank``."""
    if method in memory.METHODS:
        return memory.method_state_bytes(method, params, rank)
    if method not in _FORMULAS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    if method in ("galore", "apollo") and rank is None:
        raise ValueError(f"{method} needs an int rank, got rank=None")
    params = list(params)
    total = sum(_FORMULAS[method](p, rank) for p in params)
    if method == "adamw8bit_bnb" and any(p.numel >= 4096 for p in params):
        total += 2 * 256 * 4  # the signed and unsigned code books, shared by all tensors
    return total


# ---- measuring live optimizers ---------------------------------------------------------------


def storage_key(t) -> tuple:
    """Identifies the storage behind ``t`` (meta and storage-less tensors by object identity)."""
    try:
        ptr = 0 if t.device.type == "meta" else t.untyped_storage().data_ptr()
    except Exception:
        ptr = 0
    return (t.device.type, ptr) if ptr else ("id", id(t))


def _view_key(t) -> tuple:
    """Identifies one view of a storage: two state entries with equal keys are the same tensor."""
    return (*storage_key(t), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def optimizer_state_tensors(optimizer, max_depth: int = 4) -> list:
    """Every distinct tensor reachable from ``optimizer.state``.

    Walks dicts, lists, tuples, tensor subclasses (torchao's 8-bit state: its ``codes``,
    ``scale``, ``qmap``) and the attributes of helper objects kept in the state (GaLore and
    APOLLO projectors). Each tensor view is returned once; a tensor shared by several
    parameters' state (bitsandbytes' code books) once.
    """
    import torch
    from torch import nn

    found: list[torch.Tensor] = []
    seen_views: set = set()
    seen_objects: set[int] = set()

    def add(t: torch.Tensor) -> None:
        if type(t) is not torch.Tensor and type(t) is not nn.Parameter and hasattr(t, "__tensor_flatten__"):
            names, _ = t.__tensor_flatten__()
            for name in names:
                add(getattr(t, name))
            return
        key = _view_key(t)
        if key not in seen_views:
            seen_views.add(key)
            found.append(t)

    def visit(obj, depth: int) -> None:
        if depth > max_depth or id(obj) in seen_objects:
            return
        seen_objects.add(id(obj))
        if isinstance(obj, torch.Tensor):
            add(obj)
        elif isinstance(obj, dict):
            for value in obj.values():
                visit(value, depth + 1)
        elif isinstance(obj, (list, tuple, set, frozenset)):
            for value in obj:
                visit(value, depth + 1)
        elif isinstance(obj, (str, bytes, int, float, bool, type(None), nn.Module, torch.optim.Optimizer)):
            return
        elif hasattr(obj, "__dict__"):
            for value in vars(obj).values():
                visit(value, depth + 1)

    for state in optimizer.state.values():
        visit(state, 0)
    return found


def optimizer_state_bytes(optimizer) -> int:
    """Exact bytes of the tensors held in an optimizer's state (``numel * element_size``)."""
    return sum(t.numel() * t.element_size() for t in optimizer_state_tensors(optimizer))

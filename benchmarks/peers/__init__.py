"""Peer optimizers for the Flora benchmarks: the contender registry lives in the lab
(``flora_lab.contenders``, ``lab/flora_lab/contenders.py``); this package re-exports it for the
benchmark scripts and holds what is specific to the benchmark machines (``ref_worker.py``,
``smoke.py``, the venv recipes).

See ``README.md`` for what works with which versions. Run inside ``$FLORA_PEERS_VENV`` (default
``/work/venv-peers``, built by ``benchmarks/setup_peers.sh``) with this repository's ``lab/``
on ``PYTHONPATH`` or ``flora-lab`` installed; the reference ``flora-opt==0.0.3`` lives in
``$FLORA_REF_VENV``.
"""

import os as _os
import sys as _sys

_LAB = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))), "lab")
if _LAB not in _sys.path:
    _sys.path.insert(0, _LAB)  # the lab of this checkout, installed or not

from flora_lab import contenders as registry  # noqa: E402
from flora_lab.contenders import (  # noqa: E402
    DEFAULTS,
    REGISTRY,
    Contender,
    available,
    describe,
    is_reference_flora_module,
    load_reference_flora,
    make,
    named_trainable,
    names,
    peers_venv,
    predicted_state_bytes,
    ref_python,
    ref_venv,
    register,
    run_ref_worker,
    split_lowrank,
    state_bytes,
    state_tensors,
    sweep_options,
    unregister,
    wrap_lora,
)

__all__ = [
    "DEFAULTS",
    "REGISTRY",
    "Contender",
    "available",
    "describe",
    "is_reference_flora_module",
    "load_reference_flora",
    "make",
    "named_trainable",
    "names",
    "peers_venv",
    "predicted_state_bytes",
    "ref_python",
    "ref_venv",
    "register",
    "registry",
    "run_ref_worker",
    "split_lowrank",
    "state_bytes",
    "state_tensors",
    "sweep_options",
    "unregister",
    "wrap_lora",
]

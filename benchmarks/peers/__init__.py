"""Peer optimizers for the Flora benchmarks, constructible side by side in one venv.

See ``registry.py`` for the API and ``README.md`` for what works with which versions.
Run inside ``$FLORA_PEERS_VENV`` (default ``/work/venv-peers``, built by
``benchmarks/setup_peers.sh``); the reference ``flora-opt==0.0.3`` lives in ``$FLORA_REF_VENV``.
"""

from .registry import (  # noqa: F401
    DEFAULTS,
    OWN_FLORA,
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
    ref_python,
    ref_venv,
    register,
    run_ref_worker,
    split_lowrank,
    state_bytes,
    state_tensors,
    unregister,
    wrap_lora,
)

__all__ = [
    "DEFAULTS",
    "OWN_FLORA",
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
    "ref_python",
    "ref_venv",
    "register",
    "run_ref_worker",
    "split_lowrank",
    "state_bytes",
    "state_tensors",
    "unregister",
    "wrap_lora",
]

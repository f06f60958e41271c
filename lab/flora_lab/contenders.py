"""The one contender registry: every optimizer the demo and the benchmarks train, by one name.

Every contender is built the same way::

    from flora_lab import contenders

    ok, reason = contenders.available("galore")
    if ok:
        opt = contenders.make("galore", model, lr=1e-3, rank=64)   # -> torch.optim.Optimizer

A contender's name is the name :mod:`flora_lab.peer_memory` gives its state-bytes formula when it
has one (``adamw``, ``adamw8bit_torchao``, ``adamw8bit_bnb``, ``adafactor``,
``adafactor_momentum``, ``galore``, ``apollo``, ``flora``, ``flora_8bit``; the library's
``flora_opt.memory`` and ``flora-opt memory`` use the same names for the ones they know), so
:func:`predicted_state_bytes` needs no table between names. ``flora`` and ``flora_8bit`` are
this repository's :class:`flora_opt.Flora`; ``flora_ref`` is the reference ``flora-opt==0.0.3``.

``model_or_named_params`` is an ``nn.Module`` (its trainable ``named_parameters()`` are used),
an iterable of ``(name, tensor)`` pairs, or a plain iterable of tensors (then named
``params.<i>.tensor``, so every 2-D tensor counts as a "block" matrix).

Conventions shared by all contenders (see ``DEFAULTS`` and ``describe(name)``):

* ``weight_decay`` defaults to 0.0 everywhere (several libraries default to 0.01; we override it so
  that the contenders differ only in the optimizer algorithm).
* Low-rank methods (GaLore, APOLLO) put the *2-D weights of the transformer blocks* into the
  low-rank group and everything else (embeddings, LM head, norms, biases) into a plain group,
  following the GaLore / APOLLO training scripts. A parameter is a block matrix when it is 2-D,
  is not an ``nn.Embedding`` weight, and its qualified name has an integer path component
  (``model.layers.3.mlp.up_proj.weight``, ``transformer.h.0.attn.c_attn.weight``). Override
  with ``lowrank_filter=callable(name, tensor) -> bool``.
* Unknown keyword options raise ``TypeError`` (so a typo never silently falls back to a default);
  pass ``ignore_unknown=True`` to drop options a contender does not take (handy when one sweep
  passes ``rank=`` to every contender). :func:`sweep_options` gives the options that set a
  contender's rank and resample interval, whatever the library calls them.
* ``register()`` adds a contender defined elsewhere (e.g. a variant under test).

The reference implementation is reachable two ways (the benchmark machines' venvs, see
``benchmarks/peers/README.md``):

* ``make("flora_ref", ...)`` loads the single file ``flora_opt/optimizers/torch/flora.py`` from
  the reference venv's site-packages under the private module name ``_flora_ref_torch`` (it only
  imports torch, accelerate and bitsandbytes, which the peers venv pins to the same versions), so
  it can be stepped in-process side by side with the others;
* ``run_ref_worker(...)`` runs ``benchmarks/peers/ref_worker.py`` with the reference venv's
  interpreter in a subprocess (fully isolated) and returns its JSON.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from . import peer_memory

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
    "run_ref_worker",
    "split_lowrank",
    "state_bytes",
    "state_tensors",
    "sweep_options",
    "unregister",
    "wrap_lora",
]

REF_FLORA_VERSION = "0.0.3"
# benchmarks/peers/ref_worker.py of the repository this lab is installed from (pip install -e lab)
_REF_WORKER = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks", "peers", "ref_worker.py"
)


def peers_venv() -> str:
    return os.environ.get("FLORA_PEERS_VENV", "/work/venv-peers")


def ref_venv() -> str:
    return os.environ.get("FLORA_REF_VENV", "/work/venv-ref")


def ref_python() -> str:
    return os.path.join(ref_venv(), "bin", "python")


# --------------------------------------------------------------------------------------------
# parameter handling
# --------------------------------------------------------------------------------------------


def named_trainable(model_or_named_params) -> list[tuple[str, torch.Tensor]]:
    """Normalise the accepted inputs into a list of ``(name, tensor)`` with requires_grad."""
    if isinstance(model_or_named_params, nn.Module):
        items = list(model_or_named_params.named_parameters())
    else:
        items = []
        for i, item in enumerate(model_or_named_params):
            if isinstance(item, torch.Tensor):
                items.append((f"params.{i}.tensor", item))
            elif isinstance(item, dict):
                raise TypeError(
                    "pass a module or (name, tensor) pairs, not param-group dicts: the registry "
                    "builds the groups each library expects"
                )
            else:
                name, tensor = item
                items.append((str(name), tensor))
    seen: set[int] = set()
    out = []
    for name, p in items:
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        out.append((name, p))
    if not out:
        raise ValueError("no trainable parameters")
    return out


def _embedding_ids(model_or_named_params) -> set[int]:
    if not isinstance(model_or_named_params, nn.Module):
        return set()
    return {id(m.weight) for m in model_or_named_params.modules() if isinstance(m, nn.Embedding)}


def default_lowrank_filter(name: str, p: torch.Tensor) -> bool:
    """2-D tensor whose qualified name has an integer component (a transformer-block matrix):
    :func:`flora_lab.peer_memory.is_block_matrix_name`, the convention of the GaLore/APOLLO formulas."""
    return peer_memory.is_block_matrix_name(name, p.ndim)


def split_lowrank(model_or_named_params, lowrank_filter=None):
    """Return ``(lowrank, other)`` lists of ``(name, tensor)`` per the convention above."""
    named = named_trainable(model_or_named_params)
    emb = _embedding_ids(model_or_named_params)
    filt = lowrank_filter or default_lowrank_filter
    lowrank, other = [], []
    for name, p in named:
        (lowrank if (id(p) not in emb and filt(name, p)) else other).append((name, p))
    return lowrank, other


def _two_groups(model_or_named_params, lowrank_opts: dict, lowrank_filter=None) -> list[dict]:
    lowrank, other = split_lowrank(model_or_named_params, lowrank_filter)
    groups = []
    if other:
        groups.append({"params": [p for _, p in other]})
    if lowrank:
        groups.append({"params": [p for _, p in lowrank], **lowrank_opts})
    return groups


# --------------------------------------------------------------------------------------------
# state accounting
# --------------------------------------------------------------------------------------------


def state_tensors(optimizer: torch.optim.Optimizer, max_depth: int = 4) -> list[torch.Tensor]:
    """All tensors reachable from ``optimizer.state``: plain values, containers, tensor
    subclasses (unwrapped), and attributes of helper objects kept in the state (GaLore/APOLLO
    projectors, bitsandbytes QuantState). Each distinct tensor (view) is returned once: the walk
    of :func:`flora_lab.peer_memory.optimizer_state_tensors`, which the formula checks use too."""
    return peer_memory.optimizer_state_tensors(optimizer, max_depth)


def state_bytes(optimizer: torch.optim.Optimizer, storage: bool = False) -> int:
    """Bytes of the optimizer state.

    Default (``storage=False``): the sum of ``numel * element_size`` of every distinct tensor
    reachable from ``optimizer.state`` (see ``state_tensors``; tensor subclasses are unwrapped, a
    tensor shared by several params -- e.g. bitsandbytes' code books -- counts once). This is
    the figure the libraries' memory formulas describe.

    ``storage=True``: the bytes of the underlying storages those tensors keep alive, each storage
    once. It is larger when a state tensor is a slice of a bigger buffer: galore-torch 1.0 keeps
    ``Vh[:r]`` / ``U[:, :r]`` of the SVD, which pins the whole ``min(m,n) x min(m,n)`` factor.
    """
    tensors = state_tensors(optimizer)
    if not storage:
        return sum(t.numel() * t.element_size() for t in tensors)
    total = 0
    seen: set[tuple] = set()
    for t in tensors:
        key = peer_memory.storage_key(t)
        if key in seen:
            continue
        seen.add(key)
        try:
            total += t.untyped_storage().nbytes()
        except Exception:
            total += t.numel() * t.element_size()
    return total


# --------------------------------------------------------------------------------------------
# the registry
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Contender:
    name: str
    build: Callable[..., torch.optim.Optimizer]
    defaults: dict[str, Any]
    requires: tuple[str, ...] = ()
    description: str = ""
    state_formula: str = ""
    extra_check: Callable[[], tuple[bool, str]] | None = None
    label: str = ""  # display name; ``{rank}`` is filled in by :func:`label`

    def available(self) -> tuple[bool, str]:
        from flora_opt.quantization import quiet_torchao_import

        for mod in self.requires:
            try:
                with quiet_torchao_import():  # torchao's loader warns about kernels it cannot load
                    importlib.import_module(mod)
            except Exception as e:
                return False, f"cannot import {mod}: {type(e).__name__}: {e}"
        if self.extra_check is not None:
            return self.extra_check()
        return True, "ok"

    def make(self, model_or_named_params, lr: float, *, ignore_unknown: bool = False, **opts):
        unknown = set(opts) - set(self.defaults)
        if unknown:
            if not ignore_unknown:
                raise TypeError(f"{self.name}: unknown option(s) {sorted(unknown)}; accepted: {sorted(self.defaults)}")
            opts = {k: v for k, v in opts.items() if k in self.defaults}
        merged = {**self.defaults, **opts}
        return self.build(model_or_named_params, lr, **merged)


REGISTRY: dict[str, Contender] = {}
DEFAULTS: dict[str, dict[str, Any]] = {}


def register(
    name: str,
    make_fn: Callable[..., torch.optim.Optimizer],
    *,
    defaults: dict[str, Any] | None = None,
    requires: Iterable[str] = (),
    description: str = "",
    state_formula: str = "",
    label: str = "",
    groups: bool = False,
    accept_any: bool = True,
    replace: bool = False,
) -> Contender:
    """Hook for contenders defined elsewhere (a variant under test, say).

    ``make_fn(params, lr, **opts)`` receives the list of trainable tensors, or, with
    ``groups=True``, ``[{"params": other}, {"params": block_matrices}]`` built with the same
    low-rank convention as GaLore/APOLLO (the second dict only if non-empty). With
    ``accept_any=True`` (default) every keyword option is forwarded; otherwise only the keys of
    ``defaults`` are accepted, as for the built-in contenders.
    """
    if name in REGISTRY and not replace:
        raise ValueError(f"contender {name!r} already registered (pass replace=True)")
    defaults = dict(defaults or {})

    def build(model_or_named_params, lr, lowrank_filter=None, **opts):
        if groups:
            params = _two_groups(model_or_named_params, {}, lowrank_filter)
        else:
            params = [p for _, p in named_trainable(model_or_named_params)]
        return make_fn(params, lr, **opts)

    contender = Contender(name, build, defaults, tuple(requires), description, state_formula, label=label or name)
    if accept_any:
        contender.make = _make_accept_any(contender)  # type: ignore[method-assign]
    REGISTRY[name] = contender
    DEFAULTS[name] = defaults
    return contender


def _make_accept_any(contender: Contender):
    def make_any(model_or_named_params, lr, *, ignore_unknown=False, **opts):
        return contender.build(model_or_named_params, lr, **{**contender.defaults, **opts})

    return make_any


def unregister(name: str) -> None:
    REGISTRY.pop(name, None)
    DEFAULTS.pop(name, None)


def names() -> list[str]:
    return list(REGISTRY)


def available(name: str) -> tuple[bool, str]:
    if name not in REGISTRY:
        return False, f"unknown contender {name!r}; known: {names()}"
    return REGISTRY[name].available()


def make(name: str, model_or_named_params, lr: float, **opts) -> torch.optim.Optimizer:
    if name not in REGISTRY:
        _ok, reason = available(name)
        raise KeyError(reason)
    return REGISTRY[name].make(model_or_named_params, lr, **opts)


def describe(name: str) -> dict[str, Any]:
    c = REGISTRY[name]
    return {
        "name": c.name,
        "description": c.description,
        "defaults": dict(c.defaults),
        "requires": list(c.requires),
        "state_formula": c.state_formula,
    }


def label(name: str, rank: int | None = None) -> str:
    """The contender's display name, e.g. ``Flora r=32``."""
    return REGISTRY[name].label.format(rank=rank)


def sweep_options(name: str, rank: int | None = None, interval: int | None = None) -> dict[str, Any]:
    """The options setting ``name``'s rank and projection resample interval (Flora's ``kappa``,
    GaLore/APOLLO's ``update_proj_gap``); a contender without such an option ignores it."""
    defaults = REGISTRY[name].defaults
    options: dict[str, Any] = {}
    if rank is not None and "rank" in defaults:
        options["rank"] = rank
    for key in ("kappa", "update_proj_gap"):
        if interval is not None and key in defaults:
            options[key] = interval
    return options


def predicted_state_bytes(name: str, model, **options) -> int | None:
    """The state bytes :mod:`flora_lab.peer_memory` predicts for contender ``name`` over
    ``model``'s parameters with ``options`` (``None`` when it has no formula for it)."""
    from flora_opt.memory import params_from_module

    if name not in peer_memory.METHODS or options.get("full_momentum_for"):
        return None
    merged = {**REGISTRY[name].defaults, **options}
    return peer_memory.method_state_bytes(name, params_from_module(model), merged.get("rank"))


def _params(model_or_named_params):
    return [p for _, p in named_trainable(model_or_named_params)]


def _add(name, build, defaults, requires=(), description="", state_formula="", extra_check=None, label=""):
    REGISTRY[name] = Contender(
        name, build, dict(defaults), tuple(requires), description, state_formula, extra_check, label or name
    )
    DEFAULTS[name] = REGISTRY[name].defaults


# --- plain torch ---------------------------------------------------------------------------


def _build_adamw(m, lr, lowrank_filter=None, **o):
    return torch.optim.AdamW(_params(m), lr=lr, **o)


_add(
    "adamw",
    _build_adamw,
    {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "fused": True, "foreach": None, "lowrank_filter": None},
    requires=("torch",),
    description="torch.optim.AdamW, fused=True (the fused kernel exists for CPU in torch>=2.4)",
    label="AdamW",
    state_formula="2mn fp32 (exp_avg, exp_avg_sq) + a 0-d step tensor",
)


def _build_adafactor_torch(m, lr, lowrank_filter=None, **o):
    return torch.optim.Adafactor(_params(m), lr=lr, **o)


_add(
    "adafactor_torch",
    _build_adafactor_torch,
    {
        "beta2_decay": -0.8,
        "eps": (None, 1e-3),
        "d": 1.0,
        "weight_decay": 0.0,
        "foreach": None,
        "maximize": False,
        "lowrank_filter": None,
    },
    requires=("torch",),
    description="torch.optim.Adafactor (no first moment; step size min(lr, 1/sqrt(t)) * max(eps2, RMS(p)))",
    state_formula="m + n fp32 (row_var m x 1, col_var 1 x n) + a 0-d step tensor; no momentum",
)


# --- transformers.Adafactor ----------------------------------------------------------------

# Same settings as the reference Flora's defaults, so that adafactor_momentum vs flora_ref
# differ only in the momentum compression.
_HF_ADAFACTOR_DEFAULTS = {
    "eps": (1e-30, 1e-3),
    "clip_threshold": 1.0,
    "decay_rate": -0.8,
    "weight_decay": 0.0,
    "scale_parameter": True,
    "relative_step": False,
    "warmup_init": False,
    "lowrank_filter": None,
}


def _build_adafactor_hf(m, lr, lowrank_filter=None, **o):
    from transformers.optimization import Adafactor

    return Adafactor(_params(m), lr=lr, **o)


_add(
    "adafactor",
    _build_adafactor_hf,
    {**_HF_ADAFACTOR_DEFAULTS, "beta1": None},
    requires=("transformers",),
    description="transformers.Adafactor without momentum (beta1=None), external lr, scale_parameter=True",
    label="Adafactor",
    state_formula="m + n fp32 (exp_avg_sq_row, exp_avg_sq_col) + 0-d RMS tensor; 1-D params: n",
)
_add(
    "adafactor_momentum",
    _build_adafactor_hf,
    {**_HF_ADAFACTOR_DEFAULTS, "beta1": 0.9},
    requires=("transformers",),
    description="transformers.Adafactor with full first moment (beta1=0.9): the naive Flora baseline",
    label="Adafactor+momentum",
    state_formula="mn + m + n fp32 (exp_avg, exp_avg_sq_row, exp_avg_sq_col) + 0-d RMS tensor",
)


# --- GaLore ---------------------------------------------------------------------------------

_GALORE_LOWRANK_KEYS = ("rank", "update_proj_gap", "scale", "proj_type")


def _galore_builder(cls_name):
    def build(m, lr, lowrank_filter=None, **o):
        import galore_torch

        cls = getattr(galore_torch, cls_name)
        low = {k: o.pop(k) for k in _GALORE_LOWRANK_KEYS}
        if cls_name == "GaLoreAdamW":
            o.setdefault("no_deprecation_warning", True)
        return cls(_two_groups(m, low, lowrank_filter), lr=lr, **o)

    return build


# GaLore's LLaMA-60M..1B scripts use rank 128-512 (about d_model/4), gap 200, scale 0.25.
_add(
    "galore",
    _galore_builder("GaLoreAdamW"),
    {
        "rank": 128,
        "update_proj_gap": 200,
        "scale": 0.25,
        "proj_type": "std",
        "betas": (0.9, 0.999),
        "eps": 1e-6,
        "weight_decay": 0.0,
        "correct_bias": True,
        "lowrank_filter": None,
    },
    requires=("galore_torch", "transformers"),
    description="galore_torch.GaLoreAdamW; block matrices projected by SVD every update_proj_gap steps",
    label="GaLore r={rank}",
    state_formula="GaLore paper Table 1: mr + 2nr for m <= n (projector r*min(m,n) + Adam moments 2*r*max(m,n))",
)


def _build_galore_adafactor(m, lr, lowrank_filter=None, **o):
    import galore_torch

    low = {k: o.pop(k) for k in _GALORE_LOWRANK_KEYS}
    return galore_torch.GaLoreAdafactor(_two_groups(m, low, lowrank_filter), lr=lr, **o)


_add(
    "galore_adafactor",
    _build_galore_adafactor,
    {
        "rank": 128,
        "update_proj_gap": 200,
        "scale": 0.25,
        "proj_type": "std",
        **{k: v for k, v in _HF_ADAFACTOR_DEFAULTS.items() if k != "lowrank_filter"},
        "beta1": None,
        "lowrank_filter": None,
    },
    requires=("galore_torch", "transformers"),
    description="galore_torch.GaLoreAdafactor (Adafactor on the projected gradient)",
    state_formula="projector r*min(m,n) + factored second moment of the r x max(m,n) projected grad "
    "(r + max(m,n)); + r*max(m,n) with beta1",
)


def _galore8bit_check() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, (
            "galore-torch 1.0 GaLoreAdamW8bit.step() calls torch.cuda.synchronize() unconditionally: "
            "'AssertionError: Torch not compiled with CUDA enabled' on CPU"
        )
    return True, "ok (CUDA)"


def _build_galore_adamw8bit(m, lr, lowrank_filter=None, **o):
    import galore_torch

    low = {k: o.pop(k) for k in _GALORE_LOWRANK_KEYS}
    return galore_torch.GaLoreAdamW8bit(_two_groups(m, low, lowrank_filter), lr=lr, **o)


_add(
    "galore_adamw8bit",
    _build_galore_adamw8bit,
    {
        "rank": 128,
        "update_proj_gap": 200,
        "scale": 0.25,
        "proj_type": "std",
        "betas": (0.9, 0.999),
        "eps": 1e-8,
        "weight_decay": 0.0,
        "lowrank_filter": None,
    },
    requires=("galore_torch", "bitsandbytes"),
    description="galore_torch.GaLoreAdamW8bit (bitsandbytes 8-bit Adam on the projected gradient); CUDA only",
    state_formula="projector r*min(m,n) fp32 + 8-bit moments 2*r*max(m,n) bytes (+ absmax) ",
    extra_check=_galore8bit_check,
)


# --- APOLLO ---------------------------------------------------------------------------------

_APOLLO_LOWRANK_KEYS = ("rank", "proj", "scale_type", "scale", "update_proj_gap", "proj_type")


def _build_apollo(m, lr, lowrank_filter=None, **o):
    import apollo_torch

    low = {k: o.pop(k) for k in _APOLLO_LOWRANK_KEYS}
    return apollo_torch.APOLLOAdamW(_two_groups(m, low, lowrank_filter), lr=lr, **o)


_APOLLO_COMMON = {
    "proj": "random",
    "update_proj_gap": 200,
    "proj_type": "std",
    "betas": (0.9, 0.999),
    "eps": 1e-6,
    "weight_decay": 0.0,
    "correct_bias": True,
    "scale_front": False,
    "disable_nl": False,
    "lowrank_filter": None,
}
_add(
    "apollo",
    _build_apollo,
    {**_APOLLO_COMMON, "rank": 256, "scale_type": "channel", "scale": 1.0},
    requires=("apollo_torch", "transformers"),
    description="apollo_torch.APOLLOAdamW, channel-wise scaling (README: rank 256 for 1B/7B, scale 1)",
    label="APOLLO r={rank}",
    state_formula="moments 2*r*max(m,n) of the projected grad; apollo-torch 1.0.3 also keeps the random "
    "projection r*min(m,n) in state (not regenerated from the seed) + a 0-d norm tensor",
)
_add(
    "apollo_mini",
    _build_apollo,
    {**_APOLLO_COMMON, "rank": 1, "scale_type": "tensor", "scale": 128.0},
    requires=("apollo_torch", "transformers"),
    description="APOLLO-Mini: rank 1, tensor-wise scaling, scale 128 (README defaults)",
    state_formula="2*max(m,n) + min(m,n) + 1 (rank-1 case of the apollo formula)",
)


# --- 8-bit AdamW ----------------------------------------------------------------------------


def _build_bnb(m, lr, lowrank_filter=None, **o):
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit(_params(m), lr=lr, **o)


_add(
    "adamw8bit_bnb",
    _build_bnb,
    {
        "betas": (0.9, 0.999),
        "eps": 1e-8,
        "weight_decay": 0.0,
        "min_8bit_size": 4096,
        "is_paged": False,
        "lowrank_filter": None,
    },
    requires=("bitsandbytes",),
    description="bitsandbytes.optim.AdamW8bit (block-wise dynamic 8-bit quantization; CPU backend)",
    state_formula="2mn uint8 + 2*ceil(mn/256) fp32 absmax (+ two shared 256-entry fp32 code books); "
    "tensors with < min_8bit_size elements keep 32-bit state (2mn fp32)",
)


def _build_torchao(m, lr, lowrank_filter=None, **o):
    from flora_opt.quantization import quiet_torchao_import

    with quiet_torchao_import():
        import torchao.optim

    return torchao.optim.AdamW8bit(_params(m), lr=lr, **o)


_add(
    "adamw8bit_torchao",
    _build_torchao,
    {
        "betas": (0.9, 0.999),
        "eps": 1e-8,
        "weight_decay": 0.0,
        "block_size": 256,
        "bf16_stochastic_round": False,
        "lowrank_filter": None,
    },
    requires=("torchao.optim",),
    description="torchao.optim.AdamW8bit (tensor-subclass 8-bit state; works eagerly on CPU)",
    state_formula="2mn uint8 codes + 2*mn/block_size fp32 scales (+ a 256-entry fp32 qmap per state); "
    "tensors with < 4096 elements or numel % block_size != 0 keep fp32 state",
)


# --- LoRA (peft) ----------------------------------------------------------------------------


def wrap_lora(model: nn.Module, r: int = 8, alpha: int = 16, dropout: float = 0.0, target_modules=None):
    """Wrap a (randomly initialised) transformers model with peft LoRA adapters; no hub access.

    ``target_modules=None`` targets all linear layers of the blocks ("all-linear").
    """
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules if target_modules is not None else "all-linear",
    )
    return get_peft_model(model, cfg)


def _build_lora(m, lr, lowrank_filter=None, **o):
    named = named_trainable(m)
    if not any("lora_" in n for n, _ in named):
        raise ValueError("lora: the model has no trainable LoRA parameters; wrap it first with wrap_lora(model, r=...)")
    return torch.optim.AdamW([p for _, p in named], lr=lr, **o)


_add(
    "lora",
    _build_lora,
    {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "fused": True, "lowrank_filter": None},
    requires=("peft",),
    description="AdamW over the trainable params of a peft LoRA model (call wrap_lora first)",
    state_formula="adapters A (r x n) + B (m x r): AdamW state 2r(m+n) fp32 (weights themselves frozen)",
)


# --- this repository's Flora ---------------------------------------------------------------


def _flora_defaults() -> dict[str, Any]:
    """``flora_opt.Flora``'s own defaults (its ``defaults`` dict), the momentum switched on."""
    from flora_opt.optim import Flora

    defaults = dict(Flora([torch.zeros(1, requires_grad=True)], lr=1.0).defaults)
    for key in ("lr", "quantization"):
        defaults.pop(key, None)
    return {**defaults, "beta1": 0.9, "full_momentum_for": None, "lowrank_filter": None}


def _flora_builder(quantization: bool):
    def build(m, lr, lowrank_filter=None, full_momentum_for=None, **o):
        from flora_opt.optim import Flora

        named = named_trainable(m)
        if full_momentum_for:  # parameter-name substrings kept at rank=None (full momentum)
            keep = [p for n, p in named if any(key in n for key in full_momentum_for)]
            rest = [p for n, p in named if not any(key in n for key in full_momentum_for)]
            params = [group for group in ({"params": rest}, {"params": keep, "rank": None}) if group["params"]]
        else:
            params = [p for _, p in named]
        return Flora(params, lr=lr, quantization=quantization, **o)

    return build


_add(
    "flora",
    _flora_builder(False),
    _flora_defaults(),
    requires=("flora_opt",),
    description="flora_opt.Flora of this repository (beta1=0.9); full_momentum_for=[substrings] keeps "
    "matching parameters at full momentum",
    state_formula="docs/algorithm.md section 11: r*max(m,n) + m + n fp32 for compressed, factored matrices",
    label="Flora r={rank}",
)
_add(
    "flora_8bit",
    _flora_builder(True),
    _flora_defaults(),
    requires=("flora_opt", "torchao"),
    description="flora_opt.Flora(quantization=True): momentum and unfactored second moments in 8 bits",
    state_formula="as flora, with exp_avg/exp_avg_sq of >= 4096 elements in 8 bits (flora_opt.statebytes)",
    label="Flora r={rank} 8-bit",
)


# --- reference Flora (flora-opt==0.0.3, LGPL; called, never copied) -------------------------


def _ref_flora_file() -> str | None:
    hits = sorted(
        glob.glob(
            os.path.join(ref_venv(), "lib", "python3*", "site-packages", "flora_opt", "optimizers", "torch", "flora.py")
        )
    )
    return hits[-1] if hits else None


def _ref_flora_version() -> str | None:
    hits = glob.glob(os.path.join(ref_venv(), "lib", "python3*", "site-packages", "flora_opt-*.dist-info", "METADATA"))
    for path in hits:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("Version:"):
                    return line.split(":", 1)[1].strip()
    return None


_REF_MODULE = None


def load_reference_flora():
    """Load the reference ``flora_opt.optimizers.torch.flora`` module from ``$FLORA_REF_VENV``
    under the name ``_flora_ref_torch`` (does not touch ``sys.modules['flora_opt']``)."""
    global _REF_MODULE
    if _REF_MODULE is None:
        path = _ref_flora_file()
        if path is None:
            raise ImportError(f"reference flora-opt not found under {ref_venv()} (run benchmarks/setup_peers.sh)")
        spec = importlib.util.spec_from_file_location("_flora_ref_torch", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["_flora_ref_torch"] = module
        try:
            spec.loader.exec_module(module)
        except Exception:
            sys.modules.pop("_flora_ref_torch", None)
            raise
        _REF_MODULE = module
    return _REF_MODULE


def is_reference_flora_module(module) -> bool:
    """True when ``module`` (an imported ``flora_opt``) is the reference 0.0.3 package rather than
    this repo's: it lives under ``$FLORA_REF_VENV``, or it has no ``__version__`` attribute and
    the reference layout ``optimizers/torch/flora.py``."""
    path = os.path.abspath(getattr(module, "__file__", "") or "")
    if path.startswith(os.path.abspath(ref_venv()) + os.sep):
        return True
    ref_layout = os.path.exists(os.path.join(os.path.dirname(path), "optimizers", "torch", "flora.py"))
    return ref_layout and not hasattr(module, "__version__")


def _ref_check() -> tuple[bool, str]:
    path = _ref_flora_file()
    if path is None:
        return False, f"reference flora-opt not installed in {ref_venv()} (run benchmarks/setup_peers.sh)"
    version = _ref_flora_version()
    if version != REF_FLORA_VERSION:
        return False, f"reference venv has flora-opt {version}, expected {REF_FLORA_VERSION}"
    try:
        load_reference_flora()
    except Exception as e:
        return False, f"loading {path} failed: {type(e).__name__}: {e}"
    return True, f"ok ({path})"


def _build_flora_ref(m, lr, lowrank_filter=None, **o):
    module = load_reference_flora()
    return module.Flora(_params(m), lr=lr, **o)


_add(
    "flora_ref",
    _build_flora_ref,
    {
        "rank": 8,
        "kappa": 1000,
        "beta1": 0.9,
        "eps": (1e-30, 1e-3),
        "clip_threshold": 1.0,
        "decay_rate": -0.8,
        "weight_decay": 0.0,
        "scale_parameter": True,
        "relative_step": False,
        "factorize_second_moment": True,
        "seed": 0,
        "quantization": False,
        "lowrank_filter": None,
    },
    requires=("torch", "accelerate", "bitsandbytes"),
    description="reference Flora (flora-opt==0.0.3 from $FLORA_REF_VENV). NB: the library's own defaults "
    "are beta1=None and rank=None (= plain factored Adafactor, no momentum); the registry "
    "defaults to beta1=0.9, rank=8 so that momentum compression is actually exercised",
    state_formula="factored momentum (2-D, min(m,n) >= r, max/min <= 4): r*max(m,n) + m + n fp32 "
    "+ 0-d RMS; other 2-D: mn + m + n; 1-D: 2n (beta1 set) or n",
    extra_check=_ref_check,
)


def run_ref_worker(
    model: str | dict = "llama-tiny",
    steps: int = 5,
    rank: int | None = 8,
    kappa: int = 1000,
    lr: float = 1e-3,
    beta1: float | None = 0.9,
    batch_size: int = 2,
    seq_len: int = 64,
    seed: int = 0,
    threads: int | None = None,
    extra: Iterable[str] = (),
    timeout: float = 1800,
    python: str | None = None,
) -> dict:
    """Run ``ref_worker.py`` under the reference venv and return its JSON result."""
    cmd = [
        python or ref_python(),
        _REF_WORKER,
        "--model",
        model if isinstance(model, str) else json.dumps(model),
        "--steps",
        str(steps),
        "--kappa",
        str(kappa),
        "--lr",
        repr(lr),
        "--batch-size",
        str(batch_size),
        "--seq-len",
        str(seq_len),
        "--seed",
        str(seed),
    ]
    cmd += ["--rank", "none" if rank is None else str(rank)]
    cmd += ["--beta1", "none" if beta1 is None else repr(beta1)]
    if threads:
        cmd += ["--threads", str(threads)]
    cmd += list(extra)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # never shadow the ref package
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd="/")
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip().startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"ref_worker failed (rc={proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(lines[-1])

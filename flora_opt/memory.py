"""Exact optimizer-state bytes and a training-step memory breakdown, without allocating weights.

``flora-opt memory MODEL`` (see ``docs/cli.md``) is a thin layer over this module. A model is a
Hugging Face config (a built-in preset from :data:`PRESETS` or a local ``config.json``); it is
instantiated on the ``meta`` device, so only parameter *shapes* exist and a 13B model costs
nothing. For each optimizer the state bytes follow from the shapes by the formulas below, which
``tests/test_memory_estimator.py`` checks against the bytes each optimizer actually allocates.

Formulas per parameter (``m x n`` matrix view, ``N`` elements, ``s`` bytes per parameter
element, ``r`` the rank):

==========================  =====================================================================
optimizer                   state bytes
==========================  =====================================================================
AdamW (``torch.optim``)     ``2 N s`` (exp_avg, exp_avg_sq in the parameter dtype) + 4 (0-d step)
AdamW 8-bit (torchao)       per moment: ``N + 4 N/256 + 1024`` (codes, scales, own qmap) if
                            ``N >= 4096`` and ``256 | N``, else ``N s``; + 4 (0-d step)
AdamW 8-bit (bitsandbytes)  per moment: ``N + 4 ceil(N/256)`` if ``N >= 4096``, else ``4 N``;
                            + 2 x 1024 for the two code books shared by all tensors
Adafactor (transformers)    ``ndim >= 2``: ``4 (prod(shape[:-1]) + prod(shape[:-2]) shape[-1])``
                            (row and column statistics), else ``4 N``; ``+ 4 N`` with momentum;
                            + 4 (0-d RMS)
GaLore (``GaLoreAdamW``)    block matrices: ``s r' (min(m, n) + 2 max(m, n))``, ``r' = min(r,
                            min(m, n))`` (SVD projector + Adam moments of the projected gradient);
                            other tensors AdamW ``2 N s``
APOLLO (``APOLLOAdamW``)    block matrices: ``s r (min(m, n) + 2 max(m, n)) + 4`` (random
                            projector kept in state, moments, 0-d norm); other tensors ``2 N s``
Flora (this package)        ``flora_opt.core.tensor_layout``: compressed momentum ``4 r max(m, n)``
                            if ``min(m, n) > r`` and ``max(m, n) <= 4 min(m, n)``, else ``4 N``;
                            factored second moment ``4 (m + n)`` if ``min(m, n) >= 128``, else ``4 N``;
                            8-bit states of ``N' >= 4096`` elements: ``ceil(N'/256) (256 + 4)``
                            (docs/algorithm.md section 11)
==========================  =====================================================================

GaLore and APOLLO project the 2-D weights of the transformer blocks only (their training
scripts' convention, as ``benchmarks/peers``): a parameter is a *block matrix* when it is 2-D, is
not an embedding, is not the output head, and its name has an integer component (``...layers.3...``).
Flora keeps full momentum for embedding-like matrices (``max(m, n) > max_aspect_ratio * min(m, n)``,
default 4) and compresses every other matrix view with ``min(m, n) > r``.

The training-step breakdown adds weights and gradients (both in the parameter dtype) to the
optimizer state. Without layer-wise updates every gradient is alive at ``optimizer.step()``;
with layer-wise updates (``flora_opt.enable_layerwise_updates``) each gradient is consumed and freed as soon as
it is complete, so the peak holds the largest single gradient plus the gradients of tied
parameters (a tied weight's gradient accumulates over two uses, so it lives through most of
backward). Activations are not included (they depend on batch, sequence and checkpointing).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "METHODS",
    "PRESETS",
    "ParamInfo",
    "estimate",
    "format_table",
    "load_config",
    "method_state_bytes",
    "optimizer_state_bytes",
    "optimizer_state_tensors",
    "params_from_config",
    "params_from_module",
    "storage_key",
]

# ---- built-in model configs (published architectures, random init, never downloaded) -------

_GPT2 = dict(model_type="gpt2", vocab_size=50257, n_positions=1024, tie_word_embeddings=True)


def _llama(hidden, intermediate, layers, heads, vocab=32000, kv_heads=None, max_pos=2048, tie=False):
    return dict(
        model_type="llama",
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        vocab_size=vocab,
        max_position_embeddings=max_pos,
        tie_word_embeddings=tie,
    )


#: name -> (Hugging Face config dict, source). GPT-2 sizes from Radford et al. (2019) / the
#: ``gpt2*`` configs; LLaMA 60M-1B from the GaLore pre-training configs (``llama_60m.json`` ...
#: ``llama_1b.json``); LLaMA 7B/13B from Touvron et al. (2023), Table 2.
PRESETS: dict[str, tuple[dict[str, Any], str]] = {
    "gpt2": ({**_GPT2, "n_embd": 768, "n_layer": 12, "n_head": 12}, "GPT-2 small, 124M"),
    "gpt2-medium": ({**_GPT2, "n_embd": 1024, "n_layer": 24, "n_head": 16}, "GPT-2 medium, 355M"),
    "gpt2-large": ({**_GPT2, "n_embd": 1280, "n_layer": 36, "n_head": 20}, "GPT-2 large, 774M"),
    "gpt2-xl": ({**_GPT2, "n_embd": 1600, "n_layer": 48, "n_head": 25}, "GPT-2 XL, 1.5B"),
    "llama-60m": (_llama(512, 1376, 8, 8, max_pos=1024), "GaLore llama_60m"),
    "llama-134m": (_llama(768, 2048, 12, 12, max_pos=1024), "GaLore llama_130m (134M parameters)"),
    "llama-350m": (_llama(1024, 2736, 24, 16, max_pos=1024), "GaLore llama_350m"),
    "llama-1b": (_llama(2048, 5461, 24, 32, max_pos=1024), "GaLore llama_1b"),
    "llama-7b": (_llama(4096, 11008, 32, 32), "LLaMA 7B (Touvron et al., 2023)"),
    "llama-13b": (_llama(5120, 13824, 40, 40), "LLaMA 13B (Touvron et al., 2023)"),
}

#: Optimizer rows of the estimate, in table order.
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

_LABELS = {
    "adamw": "AdamW (fp32 states)",
    "adamw8bit_torchao": "AdamW 8-bit (torchao)",
    "adamw8bit_bnb": "AdamW 8-bit (bitsandbytes)",
    "adafactor": "Adafactor",
    "adafactor_momentum": "Adafactor + momentum",
    "galore": "GaLore AdamW r={rank}",
    "apollo": "APOLLO r={rank}",
    "flora": "Flora r={rank}",
    "flora_8bit": "Flora r={rank} 8-bit",
}

_DTYPES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}
_BLOCK_RE = re.compile(r"(^|\.)\d+\.")


class ModelConfigError(ValueError):
    """An unknown preset, an unreadable config.json, or a config transformers cannot build."""


@dataclass(frozen=True)
class ParamInfo:
    """What the formulas need to know about one (deduplicated) parameter."""

    name: str
    shape: tuple[int, ...]
    itemsize: int = 4
    embedding: bool = False
    uses: int = 1  # modules sharing it (> 1: tied)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def block_matrix(self) -> bool:
        """GaLore/APOLLO convention: 2-D, not an embedding or the output head, inside a block."""
        lowered = self.name.lower()
        if len(self.shape) != 2 or self.embedding or "emb" in lowered or "lm_head" in lowered:
            return False
        return bool(_BLOCK_RE.search(self.name))


# ---- models --------------------------------------------------------------------------------


# size fields of Hugging Face configs that must be positive integers when present
_SIZE_KEYS = (
    "n_layer",
    "num_hidden_layers",
    "n_embd",
    "hidden_size",
    "n_head",
    "num_attention_heads",
    "num_key_value_heads",
    "n_inner",
    "intermediate_size",
    "vocab_size",
    "n_positions",
    "max_position_embeddings",
)


def _check_sizes(config: Mapping[str, Any], source: str) -> None:
    for key in _SIZE_KEYS:
        value = config.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ModelConfigError(f"{source}: {key} must be a positive integer, got {value!r}")


def load_config(model: str) -> tuple[str, dict[str, Any], str]:
    """``(name, config dict, source)`` for a preset name or a path to a ``config.json``.

    Size fields (``n_layer``, ``hidden_size``, ...) must be positive integers."""
    if model in PRESETS:
        config, source = PRESETS[model]
        return model, dict(config), f"preset: {source}"
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise ModelConfigError(f"config file not found: {str(path)!r}")
        try:
            config = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ModelConfigError(f"cannot read {str(path)!r} as JSON: {error}") from error
        if not isinstance(config, dict) or "model_type" not in config:
            raise ModelConfigError(f'{str(path)!r} is not a Hugging Face config: it has no "model_type"')
        _check_sizes(config, repr(str(path)))
        return path.stem if path.name != "config.json" else path.parent.name or "config", config, str(path)
    raise ModelConfigError(
        f"unknown model {model!r}: not a preset and not a config.json path. Presets: {', '.join(PRESETS)}"
    )


def _quiet_imports():
    """Silence the optional-kernel warnings torchao and torch print when transformers imports them."""
    import logging

    for name in ("torchao", "torch.utils._pytree", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def params_from_module(module, itemsize: int | None = None) -> list[ParamInfo]:
    """Deduplicated trainable parameters of an ``nn.Module`` (meta or real)."""
    from torch import nn

    embeddings = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
    uses: dict[int, int] = {}
    for _, p in module.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    infos = []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        infos.append(
            ParamInfo(
                name=name,
                shape=tuple(int(s) for s in p.shape),
                itemsize=itemsize or p.element_size(),
                embedding=id(p) in embeddings,
                uses=uses[id(p)],
            )
        )
    return infos


def params_from_config(config: Mapping[str, Any], itemsize: int = 4) -> list[ParamInfo]:
    """Build the model on the meta device (no weights allocated) and list its parameters."""
    _quiet_imports()
    import torch

    try:
        import transformers
    except ImportError as error:  # pragma: no cover - transformers is in the dev/demo setups
        raise ModelConfigError("flora-opt memory needs transformers: pip install transformers") from error
    config = dict(config)
    model_type = config.pop("model_type")
    try:
        hf_config = transformers.AutoConfig.for_model(model_type, **config)
    except (ValueError, KeyError, TypeError) as error:
        raise ModelConfigError(f"transformers cannot build a config of model_type {model_type!r}: {error}") from error
    with torch.device("meta"):
        model = None
        errors = []
        for auto in (transformers.AutoModelForCausalLM, transformers.AutoModel):
            try:
                model = auto.from_config(hf_config)
                break
            except (ValueError, KeyError, TypeError) as error:
                errors.append(str(error))
        if model is None:
            raise ModelConfigError(f"transformers cannot build a model for model_type {model_type!r}: {errors[-1]}")
    return params_from_module(model, itemsize)


# ---- formulas --------------------------------------------------------------------------------


def _adamw(p: ParamInfo, **_) -> int:
    return 2 * p.numel * p.itemsize + 4


def _adamw8bit_torchao(p: ParamInfo, **_) -> int:
    n = p.numel
    if n >= 4096 and n % 256 == 0:
        return 2 * (n + 4 * (n // 256) + 1024) + 4
    return 2 * n * p.itemsize + 4


def _adamw8bit_bnb(p: ParamInfo, **_) -> int:
    n = p.numel
    if n >= 4096:
        return 2 * (n + 4 * math.ceil(n / 256))
    return 2 * 4 * n


def _adafactor(p: ParamInfo, momentum: bool = False, **_) -> int:
    shape = p.shape
    second = math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1] if len(shape) >= 2 else p.numel
    return 4 * second + (4 * p.numel if momentum else 0) + 4


def _galore(p: ParamInfo, rank: int, **_) -> int:
    if not p.block_matrix:
        return 2 * p.numel * p.itemsize
    m, n = p.shape
    r = min(rank, m, n)
    return p.itemsize * r * (min(m, n) + 2 * max(m, n))


def _apollo(p: ParamInfo, rank: int, **_) -> int:
    if not p.block_matrix:
        return 2 * p.numel * p.itemsize
    m, n = p.shape
    return p.itemsize * rank * (min(m, n) + 2 * max(m, n)) + 4


def _flora(p: ParamInfo, rank: int, quantization: bool = False, beta1: float | None = 0.9, **_) -> int:
    from . import core
    from .statebytes import state_bytes

    if p.numel == 0:
        return 0
    return state_bytes(core.tensor_layout(p.shape, core.FloraHyperParams(rank=rank, beta1=beta1)), quantization)


_FORMULAS = {
    "adamw": _adamw,
    "adamw8bit_torchao": _adamw8bit_torchao,
    "adamw8bit_bnb": _adamw8bit_bnb,
    "adafactor": _adafactor,
    "adafactor_momentum": lambda p, **o: _adafactor(p, momentum=True),
    "galore": _galore,
    "apollo": _apollo,
    "flora": _flora,
    "flora_8bit": lambda p, **o: _flora(p, o["rank"], quantization=True),
}


def method_state_bytes(method: str, params: Iterable[ParamInfo], rank: int | None = 256) -> int:
    """Exact optimizer-state bytes of ``method`` (one of :data:`METHODS`) for ``params``.

    ``rank=None`` means full momentum for Flora; GaLore and APOLLO need an int rank.
    """
    if method not in _FORMULAS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    params = list(params)
    if method in ("galore", "apollo") and rank is None:
        raise ValueError(f"{method} needs an int rank")
    total = sum(_FORMULAS[method](p, rank=rank) for p in params)
    if method == "adamw8bit_bnb" and any(p.numel >= 4096 for p in params):
        total += 2 * 256 * 4  # the signed and unsigned code books, shared by all tensors
    return total


# ---- estimate and report ---------------------------------------------------------------------


@dataclass
class Estimate:
    model: str
    source: str
    n_params: int
    dtype: str
    rank: int | None
    weights_bytes: int
    grads_bytes: int
    grads_layerwise_bytes: int
    rows: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def estimate(
    model: str | None = None,
    *,
    params: list[ParamInfo] | None = None,
    rank: int | None = 256,
    quantization: bool = False,
    dtype: str = "fp32",
    methods: Iterable[str] | None = None,
) -> Estimate:
    """Memory estimate for a preset / config path (``model``) or an explicit ``params`` list.

    ``quantization=True`` adds the 8-bit Flora row (``flora_8bit``) to the default methods.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"Invalid dtype: {dtype!r}: valid: {', '.join(_DTYPES)}")
    itemsize = _DTYPES[dtype]
    source = "explicit parameter list"
    name = model or "model"
    if params is None:
        if model is None:
            raise ValueError("pass a model name/path or params")
        name, config, source = load_config(model)
        params = params_from_config(config, itemsize)
    else:
        params = [ParamInfo(p.name, p.shape, itemsize, p.embedding, p.uses) for p in params]
    if methods is None:
        methods = [m for m in METHODS if m != "flora_8bit" or quantization]
        if rank is None:
            methods = [m for m in methods if m not in ("galore", "apollo")]
    n_params = sum(p.numel for p in params)
    weights = n_params * itemsize
    grads = weights
    tied = sum(p.numel * p.itemsize for p in params if p.uses > 1)
    largest_untied = max((p.numel * p.itemsize for p in params if p.uses == 1), default=0)
    grads_layerwise = min(grads, tied + largest_untied)
    result = Estimate(name, source, n_params, dtype, rank, weights, grads, grads_layerwise)
    adamw = method_state_bytes("adamw", params, rank)
    for method in methods:
        state = method_state_bytes(method, params, rank)
        label = _LABELS[method].format(rank=rank)
        result.rows.append(
            dict(
                method=method,
                optimizer=label,
                state_bytes=state,
                state_vs_adamw=state / adamw if adamw else float("nan"),
                total_bytes=weights + grads + state,
                total_layerwise_bytes=weights + grads_layerwise + state,
            )
        )
    return result


def _fmt(nbytes: int, unit: str) -> str:
    div = {"MiB": 2**20, "GiB": 2**30}[unit]
    return f"{nbytes / div:,.2f}"


def format_table(est: Estimate) -> str:
    """A plain-text table of :func:`estimate`'s result."""
    unit = "GiB" if est.weights_bytes >= 2**30 else "MiB"
    lines = [
        f"{est.model}: {est.n_params:,} parameters ({est.source}), {est.dtype} weights and gradients",
        f"weights {_fmt(est.weights_bytes, unit)} {unit}; gradients {_fmt(est.grads_bytes, unit)} {unit} "
        f"(layer-wise: {_fmt(est.grads_layerwise_bytes, unit)} {unit})",
        "",
    ]
    header = ["optimizer", f"state {unit}", "vs AdamW", f"step total {unit}", f"layer-wise total {unit}"]
    rows = [
        [
            row["optimizer"],
            _fmt(row["state_bytes"], unit),
            f"{row['state_vs_adamw']:.3f}",
            _fmt(row["total_bytes"], unit),
            _fmt(row["total_layerwise_bytes"], unit),
        ]
        for row in est.rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    out = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths, strict=True)))]
    out.append("  ".join("-" * w for w in widths))
    out.extend(
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        for row in rows
    )
    lines.extend(out)
    lines.append("")
    lines.append("step total = weights + gradients + optimizer state (activations not included);")
    lines.append("layer-wise = each gradient freed as soon as its tensor is updated. Formulas: docs/cli.md.")
    return "\n".join(lines)


# ---- measuring real optimizers ---------------------------------------------------------------


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

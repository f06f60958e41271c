"""Exact optimizer-state bytes and a training-step memory breakdown, without allocating weights.

``flora-opt memory MODEL`` (see ``docs/cli.md``) is a thin layer over this module. A model is a
Hugging Face config (a built-in preset from :data:`PRESETS` or a local ``config.json``); it is
instantiated on the ``meta`` device, so only parameter *shapes* exist and a 13B model costs
nothing. For each optimizer the state bytes follow from the shapes by the formulas below, which
``tests/test_memory_estimator.py`` checks against the bytes each optimizer actually allocates.
The formulas of the peers the benchmarks also compare (8-bit AdamW, GaLore, APOLLO) are the
lab's (``flora_lab.peer_memory``); :meth:`Estimate.add_row` takes their bytes.

Formulas per parameter (``m x n`` matrix view, ``N`` elements, ``s`` bytes per parameter
element, ``r`` the rank):

==========================  =====================================================================
optimizer                   state bytes
==========================  =====================================================================
AdamW (``torch.optim``)     ``2 N s`` (exp_avg, exp_avg_sq in the parameter dtype) + 4 (0-d step)
Adafactor (transformers)    ``ndim >= 2``: ``4 (prod(shape[:-1]) + prod(shape[:-2]) shape[-1])``
                            (row and column statistics), else ``4 N``; ``+ 4 N`` with momentum;
                            + 4 (0-d RMS)
Flora (this package)        ``flora_opt.core.tensor_layout``: compressed momentum ``4 r max(m, n)``
                            if ``min(m, n) > r`` and ``max(m, n) <= 4 min(m, n)``, else ``4 N``;
                            factored second moment ``4 (m + n)`` if ``min(m, n) >= 128``, else ``4 N``;
                            8-bit states of ``N' >= 4096`` elements: ``ceil(N'/256) (256 + 4)``
                            (docs/algorithm.md section 11)
==========================  =====================================================================

The training-step breakdown adds weights and gradients (both in the parameter dtype) to the
optimizer state. Without layer-wise updates every gradient is alive at ``optimizer.step()``;
with layer-wise updates (``flora_opt.enable_layerwise_updates``) each gradient is consumed and freed as soon as
it is complete, so the peak holds the largest single gradient plus the gradients of tied
parameters (a tied weight's gradient accumulates over two uses, so it lives through most of
backward). With gradient accumulation, naive accumulation keeps every gradient through the
cycle; Flora's compressed accumulation keeps ``r x max(m, n)`` buffers and ``min(m, n) x r`` bases instead
(:func:`accumulation_gradient_bytes`). Activations are not included (they depend on batch,
sequence and checkpointing).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "DTYPE_BYTES",
    "FLORA_METHODS",
    "METHODS",
    "PRESETS",
    "Estimate",
    "ModelConfigError",
    "ParamInfo",
    "accumulation_gradient_bytes",
    "estimate",
    "format_table",
    "load_config",
    "method_state_bytes",
    "params_from_config",
    "params_from_module",
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

#: Optimizer rows of the estimate, in table order: Flora and the two optimizers it is measured
#: against in the paper (AdamW; Adafactor, whose factored second moment Flora keeps).
METHODS = ("adamw", "adafactor", "adafactor_momentum", "flora", "flora_8bit")

#: The rows that accumulate gradients compressed (``CompressedAccumulator`` at the estimate's rank).
FLORA_METHODS = ("flora", "flora_8bit")

_LABELS = {
    "adamw": "AdamW",
    "adafactor": "Adafactor",
    "adafactor_momentum": "Adafactor + momentum",
    "flora": "Flora r={rank}",
    "flora_8bit": "Flora r={rank} 8-bit",
}

#: Bytes per element of the weight and gradient dtypes the estimate takes.
DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}


class ModelConfigError(ValueError):
    """An unknown preset, an unreadable config.json, or a config transformers cannot build."""


@dataclass(frozen=True)
class ParamInfo:
    """What the formulas need to know about one (deduplicated) parameter."""

    name: str
    shape: tuple[int, ...]
    itemsize: int = 4
    embedding: bool = False  # the weight of an nn.Embedding
    uses: int = 1  # modules sharing it (> 1: tied)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


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
    """Build the model on the meta device (no weights allocated) and list its parameters.

    Needs torch and transformers (``pip install 'flora-optim[torch,hf]'``); their ImportError
    propagates."""
    import torch

    from .quantization import quiet_torchao_import

    config = dict(config)
    model_type = config.pop("model_type")
    # transformers imports torchao (when installed) to build a model
    with quiet_torchao_import(), torch.device("meta"):
        import transformers

        try:
            hf_config = transformers.AutoConfig.for_model(model_type, **config)
        except (ValueError, KeyError, TypeError) as error:
            raise ModelConfigError(
                f"transformers cannot build a config of model_type {model_type!r}: {error}"
            ) from error
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


def _adamw(p: ParamInfo) -> int:
    return 2 * p.numel * p.itemsize + 4


def _adafactor(p: ParamInfo, momentum: bool) -> int:
    shape = p.shape
    second = math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1] if len(shape) >= 2 else p.numel
    return 4 * second + (4 * p.numel if momentum else 0) + 4


def _flora(p: ParamInfo, rank: int | None, quantization: bool) -> int:
    from . import core
    from .statebytes import state_bytes

    if p.numel == 0:
        return 0
    return state_bytes(core.tensor_layout(p.shape, core.FloraHyperParams(rank=rank)), quantization)


_FORMULAS = {
    "adamw": lambda p, rank: _adamw(p),
    "adafactor": lambda p, rank: _adafactor(p, momentum=False),
    "adafactor_momentum": lambda p, rank: _adafactor(p, momentum=True),
    "flora": lambda p, rank: _flora(p, rank, quantization=False),
    "flora_8bit": lambda p, rank: _flora(p, rank, quantization=True),
}


def method_state_bytes(method: str, params: Iterable[ParamInfo], rank: int | None = 256) -> int:
    """Exact optimizer-state bytes of ``method`` (one of :data:`METHODS`) for ``params``.

    ``rank`` is Flora's (``None``: full momentum); the other methods ignore it.
    """
    if method not in _FORMULAS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    return sum(_FORMULAS[method](p, rank) for p in params)


def accumulation_gradient_bytes(params: Iterable[ParamInfo], rank: int | None) -> int:
    """Peak gradient bytes of compressed accumulation with layer-wise updates
    (``CompressedAccumulator(optimizer, rank, layerwise=True)``, more than one micro-batch).

    Between micro-batches each tensor compressed at ``rank`` (``core.accumulation_layout``) holds
    a float32 buffer of ``rank x max(m, n)`` and the default (subspace) estimator's float32 basis
    of ``min(m, n) x rank``, every other tensor its gradient in ``.grad``; while
    backward runs, one full gradient of a compressed tensor exists until its hook compresses it
    (the largest of them counted), and a tied tensor's gradient from its first use on. At the last
    micro-batch each tensor is decompressed, stepped and freed in turn.
    """
    from . import core

    held, largest, tied = 0, 0, 0
    for p in params:
        layout = core.accumulation_layout(p.shape, rank)
        gradient = p.numel * p.itemsize
        if not layout.compressed:
            held += gradient
            continue
        held += 4 * (math.prod(layout.buffer_shape()) + math.prod(layout.basis_shape()))
        if p.uses > 1:
            tied += gradient
        else:
            largest = max(largest, gradient)
    return held + tied + largest


# ---- estimate and report ---------------------------------------------------------------------


@dataclass
class Estimate:
    """Memory of one training step of a model, per optimizer (:func:`estimate`).

    Every byte count is exact for the model's parameter shapes; activations, temporaries of the
    step and the framework's own memory are not included. Per row (:meth:`add_row`):
    ``total_bytes`` = weights + all gradients + state; ``total_layerwise_bytes`` = weights + the
    gradients layer-wise updates keep alive + state; ``total_accumulation_bytes`` = the peak of a
    step that accumulates gradients over micro-batches: naive accumulation keeps every gradient
    (weights + gradients + state), Flora's compressed accumulation with layer-wise updates keeps
    :func:`accumulation_gradient_bytes`.
    """

    model: str
    source: str
    n_params: int
    dtype: str
    rank: int | None
    weights_bytes: int
    grads_bytes: int
    grads_layerwise_bytes: int
    grads_accumulation_bytes: int
    adamw_state_bytes: int
    rows: list[dict[str, Any]] = field(default_factory=list)

    def add_row(self, method: str, label: str, state_bytes: int, *, compressed_accumulation: bool = False) -> None:
        """Append the row of an optimizer whose state takes ``state_bytes`` (for a peer whose
        formula lives elsewhere, e.g. the lab's); ``compressed_accumulation`` says whether it
        accumulates gradients compressed (Flora's rows)."""
        accumulating = self.grads_accumulation_bytes if compressed_accumulation else self.grads_bytes
        self.rows.append(
            dict(
                method=method,
                optimizer=label,
                state_bytes=state_bytes,
                state_vs_adamw=state_bytes / self.adamw_state_bytes if self.adamw_state_bytes else float("nan"),
                total_bytes=self.weights_bytes + self.grads_bytes + state_bytes,
                total_layerwise_bytes=self.weights_bytes + self.grads_layerwise_bytes + state_bytes,
                total_accumulation_bytes=self.weights_bytes + accumulating + state_bytes,
            )
        )

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
    """Memory estimate for a preset / config path (``model``) or an explicit ``params`` list
    (then ``model`` only names it).

    ``quantization=True`` adds the 8-bit Flora row (``flora_8bit``) to the default methods;
    ``methods=()`` gives an estimate without rows, for :meth:`Estimate.add_row`.
    """
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"Invalid dtype: {dtype!r}: valid: {', '.join(DTYPE_BYTES)}")
    itemsize = DTYPE_BYTES[dtype]
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
    else:
        methods = list(methods)
        unknown = [m for m in methods if m not in _FORMULAS]
        if unknown:
            raise ValueError(f"unknown method {unknown[0]!r}; valid: {', '.join(METHODS)}")
    n_params = sum(p.numel for p in params)
    weights = n_params * itemsize
    tied = sum(p.numel * p.itemsize for p in params if p.uses > 1)
    largest_untied = max((p.numel * p.itemsize for p in params if p.uses == 1), default=0)
    result = Estimate(
        model=name,
        source=source,
        n_params=n_params,
        dtype=dtype,
        rank=rank,
        weights_bytes=weights,
        grads_bytes=weights,
        grads_layerwise_bytes=min(weights, tied + largest_untied),
        grads_accumulation_bytes=accumulation_gradient_bytes(params, rank),
        adamw_state_bytes=method_state_bytes("adamw", params),
    )
    for method in methods:
        result.add_row(
            method,
            _LABELS[method].format(rank=rank),
            method_state_bytes(method, params, rank),
            compressed_accumulation=method in FLORA_METHODS,
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
        f"(layer-wise: {_fmt(est.grads_layerwise_bytes, unit)} {unit}; compressed accumulation at rank "
        f"{est.rank}: {_fmt(est.grads_accumulation_bytes, unit)} {unit})",
        "",
    ]
    header = ["optimizer", f"state {unit}", "vs AdamW", f"step {unit}", f"layer-wise {unit}", f"accumulation {unit}"]
    rows = [
        [
            row["optimizer"],
            _fmt(row["state_bytes"], unit),
            f"{row['state_vs_adamw']:.3f}",
            _fmt(row["total_bytes"], unit),
            _fmt(row["total_layerwise_bytes"], unit),
            _fmt(row["total_accumulation_bytes"], unit),
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
    lines.append("step = weights + gradients + optimizer state (activations not included); layer-wise = each")
    lines.append("gradient freed as soon as its tensor is updated; accumulation = gradients accumulated over")
    lines.append("micro-batches (Flora: compressed, with layer-wise updates). Formulas: docs/cli.md.")
    return "\n".join(lines)

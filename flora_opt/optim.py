r"""``flora_opt.Flora``: the Flora optimizer for PyTorch, a thin wrapper over :mod:`flora_opt.core`.

.. math::
   \begin{aligned}
   &\eta_t = \rho_t \max(\epsilon_2, \mathrm{RMS}(W_{t-1})), \quad
     \rho_t = \text{lr or } \min(10^{-2}, 1/\sqrt t) \\
   &\hat V_t:\ \text{Adafactor's factored (or full) second moment of } G_t, \quad
     \beta_{2,t} = 1 - t^{\text{decay\_rate}} \\
   &U_t = G_t / \sqrt{\hat V_t} \\
   &P_k \in \mathbb R^{r\times \min(m,n)},\ (P_k)_{ij}\sim\mathcal N(0, 1/r),
     \ k = \lfloor (t-1)/\kappa \rfloor \text{ (regenerated from a seed)} \\
   &\text{if } t>1,\ (t-1) \bmod \kappa = 0:\ M \leftarrow P_k P_{k-1}^\top M \\
   &s = \|M\|_F / \|P_k^\top M\|_F, \quad D_t = (1-\beta_1) U_t + \beta_1 s P_k^\top M, \quad
     M_t = \beta_1 M + (1-\beta_1) P_k U_t \\
   &D_t \leftarrow D_t / \max(1, \mathrm{RMS}(D_t)/d), \qquad
     W_t = (1 - \eta_t \lambda) W_{t-1} - \eta_t D_t
   \end{aligned}

(shown for an ``m x n`` weight with ``m <= n``; for ``m > n`` the columns are compressed).
The full specification, with every threshold and every deviation from the paper and the
reference code, is ``docs/algorithm.md``.

References:
  Yongchang Hao, Yanshuai Cao, Lili Mou. "Flora: Low-Rank Adapters Are Secretly Gradient
  Compressors", ICML 2024. https://arxiv.org/abs/2402.03293
  Noam Shazeer, Mitchell Stern. "Adafactor: Adaptive Learning Rates with Sublinear Memory
  Cost", ICML 2018.
"""

from __future__ import annotations

import collections
import copy
import functools
import math
import types
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from . import core, distributed
from . import quantization as q
from .core import FloraHyperParams, TensorLayout
from .distributed import is_dtensor
from .engine import PROJECTION, Engine, read_state, write_state
from .engine import chunks as engine_chunks
from .hyperparams import (
    DEFAULTS,
    LAYOUT_OPTIONS,
    from_group,
    is_int,
    normalize_group,
    validate_group,
)
from .ops import get_ops
from .projection import tensor_seed
from .statebytes import ABSMAX_SUFFIX, CODES_SUFFIX, is_quantized_state

__all__ = ["Flora"]

# Top-level key of Flora.state_dict(); checkpoints of format 1 (before the key and the
# projection index existed) are recognised by their per-parameter keys: they always hold
# "skipped_steps", which the reference flora-opt 0.0.3's state lacks.
FORMAT_KEY = "flora_format"
STATE_FORMAT = 2


@functools.cache
def _expected_state(layout: TensorLayout, quantization: bool, sharded: bool) -> Mapping[str, tuple]:
    """The state keys of a tensor with ``layout``, with their shapes and dtypes (read only: cached,
    since every step checks every tensor's state against it)."""
    expected: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for key, shape in layout.state_shapes().items():
        if is_quantized_state(layout, key, quantization):
            blocks = q.num_blocks(math.prod(shape))
            # DTensor (FSDP2) codes keep the state's shape, so they shard like it (distributed.py)
            codes_shape = tuple(shape) if sharded else (blocks * q.BLOCK_SIZE,)
            expected[key + CODES_SUFFIX] = (codes_shape, torch.uint8)
            expected[key + ABSMAX_SUFFIX] = ((blocks,), torch.float32)
        else:
            expected[key] = (shape, torch.float32)
    return types.MappingProxyType(expected)


def _is_symbolic(tensor: torch.Tensor) -> bool:
    """Meta or fake tensors (memory estimation, deferred init): no values to test or sync on."""
    if tensor.device.type == "meta":
        return True
    if torch.compiler.is_compiling():  # real tensors under torch.compile(optimizer.step)
        return False
    try:
        from torch._subclasses.fake_tensor import is_fake
    except ImportError:  # pragma: no cover - very old torch
        return False
    return is_fake(tensor)


class Flora(torch.optim.Optimizer):
    r"""Flora: Adafactor with momentum compressed by regenerated Gaussian projections.

    A drop-in replacement for ``torch.optim.AdamW`` / ``transformers.Adafactor``: for an
    ``m x n`` weight the momentum costs ``r * max(m, n)`` floats instead of ``m * n``, and the
    second moment ``m + n`` (Adafactor's factored statistics). The projections are never
    stored: each is regenerated from an integer seed in the state (docs/algorithm.md).

    For a weight viewed as an ``m x n`` matrix with ``m <= n`` (for ``m > n`` the columns are
    compressed, ``M`` is ``m x r``); ``min(m, n) <= r``, ``rank=None`` and embedding-like
    matrices keep a full ``m x n`` momentum (``D_t = M_t``), vectors and small matrices a full
    second moment (docs/algorithm.md sections 1-8):

    .. math::
       \begin{aligned}
            &\rule{110mm}{0.4pt}                                                                 \\
            &\textbf{input}      : \rho \text{ (lr)}, \beta_1 \text{ (beta1)},
                \: c \text{ (decay\_rate)}, \: r \text{ (rank)}, \: \kappa \text{ (kappa)},
                \: d \text{ (clip\_threshold)}, \: \lambda \text{ (weight\_decay)},               \\
            &\hspace{13mm} \epsilon_1, \epsilon_2 \text{ (eps)}, \: W_0 \text{ (params)},
                \: f(W) \text{ (objective)}                                                      \\
            &\textbf{initialize} : R_0 \leftarrow 0 \in \mathbb{R}^m, \: C_0 \leftarrow 0 \in \mathbb{R}^n,
                \: M_0 \leftarrow 0 \in \mathbb{R}^{r \times n}                                  \\[-1.ex]
            &\rule{110mm}{0.4pt}                                                                 \\
            &\textbf{for} \: t=1 \: \textbf{to} \: \ldots \: \textbf{do}                         \\
            &\hspace{5mm} G_t \leftarrow \nabla_W f_t(W_{t-1})                                  \\
            &\hspace{5mm} \beta_{2,t} \leftarrow 1 - t^{c}, \quad Q \leftarrow G_t^2 + \epsilon_1 \\
            &\hspace{5mm} R_t \leftarrow \beta_{2,t} R_{t-1} + (1 - \beta_{2,t}) \,\mathrm{mean}_j Q_{ij},
                \quad C_t \leftarrow \beta_{2,t} C_{t-1} + (1 - \beta_{2,t}) \,\mathrm{mean}_i Q_{ij} \\
            &\hspace{5mm} U_t \leftarrow G_t / \sqrt{\hat V_t}, \quad
                \hat V_{t,ij} = R_{t,i} C_{t,j} / \mathrm{mean}(R_t)                           \\
            &\hspace{5mm} k \leftarrow \lfloor (t - 1)/\kappa \rfloor, \quad
                P_k \in \mathbb{R}^{r \times m}, \ (P_k)_{ij} \sim \mathcal{N}(0, 1/r)
                \text{ regenerated from (seed, } k)                                              \\
            &\hspace{5mm} \textbf{if} \: t > 1 \textbf{ and } (t - 1) \bmod \kappa = 0 \textbf{ then }
                M_{t-1} \leftarrow P_k P_{k-1}^\top M_{t-1}                                     \\
            &\hspace{5mm} s \leftarrow \|M_{t-1}\|_F / \|P_k^\top M_{t-1}\|_F                   \\
            &\hspace{5mm} D_t \leftarrow (1 - \beta_1) U_t + \beta_1 s P_k^\top M_{t-1}         \\
            &\hspace{5mm} M_t \leftarrow \beta_1 M_{t-1} + (1 - \beta_1) P_k U_t                \\
            &\hspace{5mm} D_t \leftarrow D_t / \max(1, \mathrm{RMS}(D_t) / d)                   \\
            &\hspace{5mm} \eta_t \leftarrow \rho_t \max(\epsilon_2, \mathrm{RMS}(W_{t-1}))       \\
            &\hspace{5mm} W_t \leftarrow (1 - \eta_t \lambda) W_{t-1} - \eta_t D_t               \\
            &\rule{110mm}{0.4pt}                                                          \\[-1.ex]
            &\textbf{return} \: W_t                                                       \\[-1.ex]
            &\rule{110mm}{0.4pt}                                                          \\[-1.ex]
       \end{aligned}

    with ``rho_t = lr``, or ``min(1e-2, 1/sqrt(t))`` when ``relative_step``; ``eta_t = rho_t``
    when ``scale_parameter=False``; ``s = 0`` while ``M = 0``.

    Args:
      params: iterable of tensors or of param-group dicts (every option below can be set
        per group, e.g. ``{"params": embeddings, "rank": None}``).
      lr (required): learning rate ``rho``; required unless ``relative_step`` (then it must be
        ``None``)
      rank (default 256): projection rank ``r``; a tensor whose smaller matrix dimension is
        ``<= rank`` keeps full momentum; ``None``: full momentum everywhere (the paper's
        uncompressed baseline)
      kappa (default 1000): resample the momentum projection every ``kappa`` steps, carrying the
        momentum over (``M <- P_new P_old^T M``); too small a ``kappa`` amplifies noise at each
        transfer and can diverge (a ``RuntimeWarning`` names the smallest stable value,
        docs/algorithm.md section 4)
      eps (default (1e-30, 0.001)): ``eps1``, added to squared gradients (section 6); ``eps2``,
        floor of the parameter RMS in the step size (section 5)
      clip_threshold (default 1.0): update clipping of the combined direction:
        ``D <- D / max(1, RMS(D) / clip_threshold)``
      decay_rate (default -0.8): second-moment decay ``beta2_t = 1 - t^decay_rate``
      beta1 (default 0.9): momentum; ``None`` or ``0`` disables it (then Flora is exactly
        Adafactor)
      weight_decay (default 0.0): decoupled, ``p <- p - eta_t * weight_decay * p``
      scale_parameter (default True): step size ``eta_t = rho_t * max(eps2, RMS(p))``
      relative_step (default False): ``rho_t = min(1e-2, 1/sqrt(t))`` instead of ``lr``
      warmup_init (default False): ``rho_t = min(1e-6 t, 1/sqrt(t))``; needs ``relative_step``
      factorize_second_moment (default True): Adafactor's factored second moment for matrices
        (``False``: a full, Adam-like one)
      min_dim_size_to_factor (default 128): factor only matrices whose smaller dimension is at
        least this (as ``optax.adafactor``)
      max_aspect_ratio (default 4.0): embedding-like matrices (``max(m, n) > ratio * min(m, n)``:
        token embeddings, LM heads) keep full momentum; ``None`` compresses them too
      seed (default 0): 32-bit seed of the projections
      projection_dtype (default 'float32'): precision of the two ``r x m x n`` products of
        compressed momentum, ``P U`` and ``P^T M``: ``"bfloat16"`` rounds their operands and
        results to bfloat16 (float32 sums; state, statistics and update stay float32), 2-4x
        faster on CPUs with AVX512-BF16 and GPUs
      quantization (default False): 8-bit blockwise momentum and full second moments (torchao's
        dynamic-tree code)
      foreach (default None): ``None``/``True``: the grouped step (tensors of a group with the
        same layout stepped together, no host sync after the first step); ``False``: the
        per-tensor path (one ``core.flora_update`` per tensor)

    Raises:
      ValueError: an option breaks its rule; the message names the option and the value
        (``Invalid rank: 0: must be an int >= 1, or None for full momentum``).
      TypeError: an unknown option.

    Example:
      >>> import torch, flora_opt
      >>> model = torch.nn.Linear(512, 512)
      >>> optimizer = flora_opt.Flora(model.parameters(), lr=1e-3, rank=32)
      >>> model(torch.randn(4, 512)).pow(2).mean().backward()
      >>> optimizer.step(); optimizer.zero_grad()

    Note:
      Deviations from the reference implementation (``flora-opt==0.0.3``): defaults are
      ``rank=256, beta1=0.9`` (the reference's ``rank=None, beta1=None`` silently make it
      plain Adafactor); tensors with ``ndim > 2`` are viewed as ``(shape[0], -1)`` matrices for
      both compression and factoring; a gradient with NaN/Inf skips that tensor's update
      (parameter and state untouched, ``state["skipped_steps"]`` counts it) instead of
      poisoning it; its checkpoints are refused by :meth:`load_state_dict` (their seeds are
      ``torch.Generator`` seeds). See docs/algorithm.md, "Deviations".

      The grouped step keeps step counts and skip counts on the device; ``state["step"]``,
      ``state["projection"]`` and ``state["skipped_steps"]`` are exact after
      :meth:`synchronize` (called by :meth:`state_dict`), which also raises the non-finite
      warning; without skipped steps they are always exact.

      The update is computed in float32; float64 parameters receive it in float64 (never
      rounded to float32). A ``kappa`` changed mid-run moves the next resample and carries the
      momentum over (``state["projection"]`` counts resamples).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float | torch.Tensor | None = None,
        *,
        rank: int | None = 256,
        kappa: int = 1000,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        beta1: float | None = 0.9,
        weight_decay: float = 0.0,
        scale_parameter: bool = True,
        relative_step: bool = False,
        warmup_init: bool = False,
        factorize_second_moment: bool = True,
        min_dim_size_to_factor: int = 128,
        max_aspect_ratio: float | None = 4.0,
        seed: int = 0,
        projection_dtype: str = "float32",
        quantization: bool = False,
        foreach: bool | None = None,
    ):
        # Every argument but params is an option of the record, which checks them (validate_group).
        defaults = {key: value for key, value in locals().items() if key in DEFAULTS}
        if isinstance(defaults["eps"], list):
            defaults["eps"] = tuple(defaults["eps"])
        validate_group(defaults, lr_optional=True)  # every group's lr is checked by add_param_group
        normalize_group(defaults)
        self._layout_cache: dict[tuple, TensorLayout] = {}
        self._record_cache: dict[int, tuple[tuple, FloraHyperParams]] = {}  # see _records
        # parameter -> (group index, index in the group, position in the flattened groups)
        self._positions: dict[torch.Tensor, tuple[int, int, int]] = {}
        self._engine = Engine(self)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group; it is validated first, so on error the optimizer is unchanged."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        unknown = sorted(set(param_group) - set(DEFAULTS) - {"params", "name"})
        if unknown:
            raise TypeError(
                f"Flora param group got unexpected option(s) {', '.join(map(repr, unknown))}; "
                f"valid options: {', '.join(DEFAULTS)}"
            )
        params = param_group.get("params")
        if isinstance(params, torch.Tensor):
            params = [params]
        elif params is not None and not isinstance(params, set):
            params = list(params)
        param_group = dict(param_group, params=params)
        options = {key: param_group.get(key, self.defaults[key]) for key in DEFAULTS}
        if isinstance(options["eps"], list):
            options["eps"] = tuple(options["eps"])
        validate_group(options)
        for param in params if isinstance(params, list) else ():
            if isinstance(param, torch.Tensor) and param.is_complex():
                shape = tuple(param.shape)
                raise ValueError(
                    f"Flora does not support complex parameters (shape {shape}, {param.dtype}): its second "
                    "moment, norms, clipping and 8-bit states are defined for real tensors (docs/algorithm.md "
                    f"section 1). Keep a real parameter of shape {(*shape, 2)} instead (torch.view_as_real) and "
                    "use torch.view_as_complex(parameter) in the forward pass"
                )
        super().add_param_group(param_group)
        normalize_group(self.param_groups[-1])
        self._index_group(len(self.param_groups) - 1)

    def __getstate__(self) -> dict[str, Any]:
        self.synchronize()  # a copy or a pickle holds the exact integers, not the optimistic ones
        return super().__getstate__()

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._layout_cache = {}
        self._record_cache = {}
        self._engine = Engine(self)
        for group in self.param_groups:
            for key, value in DEFAULTS.items():
                group.setdefault(key, value)
        self._reindex()

    def _index_group(self, group_index: int) -> None:
        offset = sum(len(group["params"]) for group in self.param_groups[:group_index])
        for index, param in enumerate(self.param_groups[group_index]["params"]):
            self._positions[param] = (group_index, index, offset + index)

    def _reindex(self) -> None:
        self._positions = {}
        for group_index in range(len(self.param_groups)):
            self._index_group(group_index)

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim.Optimizer.state_dict`` plus ``"flora_format"``, the state format version.

        Calls :meth:`synchronize` first, so the integers saved are exact.
        """
        self.synchronize()
        state_dict = super().state_dict()
        state_dict[FORMAT_KEY] = STATE_FORMAT
        return state_dict

    def synchronize(self) -> int:
        """Bring ``state["step"]``, ``state["projection"]`` and ``state["skipped_steps"]`` up to date.

        The grouped :meth:`step` keeps the step count, projection index and skip count of each
        tensor on its device and never reads them back inside the step (no host sync); the host
        integers advance as if no step were skipped. This reads the device counters once (one
        device-to-host copy), corrects the integers of tensors whose steps were skipped, and
        raises the non-finite ``RuntimeWarning`` for them. Called by :meth:`state_dict`,
        :meth:`load_state_dict` and :meth:`step_param`; call it to read the counts during
        training. Integers that someone else wrote into the state since the last step (as
        ``torch.distributed.checkpoint``'s ``dcp.load`` does) are kept, and the device counters
        are rebuilt from them. Returns the number of skipped tensor steps it found.
        """
        return self._engine.synchronize()

    # ---- layout and state -----------------------------------------------------------------
    def _layout(self, param: torch.Tensor, hp: FloraHyperParams) -> TensorLayout:
        key = (
            tuple(param.shape),
            hp.rank,
            hp.beta1 is not None,
            hp.factorize_second_moment,
            hp.min_dim_size_to_factor,
            hp.max_aspect_ratio,
        )
        layout = self._layout_cache.get(key)
        if layout is None:
            layout = core.tensor_layout(param.shape, hp)
            self._layout_cache[key] = layout
        return layout

    @torch.compiler.disable
    def _init_state(self, param: torch.Tensor, layout: TensorLayout, group: dict[str, Any], index: int) -> dict:
        message = core.unstable_transfer_message(layout, from_group(group))
        if message is not None:
            warnings.warn(message, RuntimeWarning, stacklevel=4)
        state = self.state[param]
        state["step"] = 0
        state["seed"] = tensor_seed(group["seed"], index)
        state["skipped_steps"] = 0
        if layout.momentum == core.MOMENTUM_COMPRESSED:
            state[PROJECTION] = 0
        for key, shape in layout.state_shapes().items():
            if is_quantized_state(layout, key, group["quantization"]):
                if is_dtensor(param):
                    codes, absmax = distributed.quantized_zeros(param, layout, key, shape)
                else:
                    codes, absmax = q.zeros(shape, param.device)
                state[key + CODES_SUFFIX] = codes
                state[key + ABSMAX_SUFFIX] = absmax
            elif is_dtensor(param):  # FSDP2: the state is sharded with the parameter
                state[key] = distributed.state_zeros(param, layout, key, shape)
            else:
                state[key] = torch.zeros(shape, dtype=torch.float32, device=param.device)
        return state

    @torch.compiler.disable
    def _init_states(self, entries: list[tuple]) -> None:
        """:meth:`_init_state` for the grouped step's parameters that have no state yet, in one call
        (under ``torch.compile``, one graph break at the first step only)."""
        for param, group_index, _, layout, position in entries:
            if "step" not in self.state[param]:
                self._init_state(param, layout, self.param_groups[group_index], position)

    def state_bytes(self) -> int:
        """Bytes of all tensors held in the optimizer state (exact)."""
        total = 0
        for state in self.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    total += value.numel() * value.element_size()
        return total

    def scratch_bytes(self) -> int:
        """Bytes of the CPU scratch buffers that the grouped step keeps from one step to the next
        for its temporaries (the largest stack of gradients and its squares; not state, not in
        :meth:`state_dict`; none on other devices). docs/algorithm.md section 8."""
        return self._engine.scratch_bytes()

    # ---- the step -------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        """Performs a single optimization step.

        Args:
          closure: re-evaluates the model and returns the loss (optional).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        records = self._records()
        entries = []  # (param, group index, record, layout, position) of the grouped step
        index = 0
        for group_index, group in enumerate(self.param_groups):
            hp = records[group_index]
            grouped = group.get("foreach") is not False
            for param in group["params"]:
                position = index
                index += 1
                if param.grad is None:
                    continue
                if not grouped or not self._groupable(param, param.grad):
                    self._update_param(param, param.grad, group, hp, position)
                    continue
                entries.append((param, group_index, hp, self._layout(param, hp), position))
        if any("step" not in self.state[entry[0]] for entry in entries):
            self._init_states(entries)
        # bucket key: (group, layout, dtypes, device); one engine step per stack of a bucket
        buckets: dict[tuple, list[torch.Tensor]] = {}
        bucket_groups: dict[tuple, tuple[dict, FloraHyperParams, TensorLayout]] = {}
        for param, group_index, hp, layout, position in entries:
            group = self.param_groups[group_index]
            self._check_state(param, self.state[param], layout, group["quantization"], position)
            key = (group_index, layout, param.dtype, param.grad.dtype, param.device)
            buckets.setdefault(key, []).append(param)
            bucket_groups[key] = (group, hp, layout)
        advanced = []
        for key, params in buckets.items():
            group, hp, layout = bucket_groups[key]
            for stack in engine_chunks(params):
                self._engine.step_bucket(stack, group, hp, layout)
            advanced.append((params, hp.kappa, layout.momentum == core.MOMENTUM_COMPRESSED))
        if advanced:
            self._engine.finish_step(advanced)
        return loss

    @torch.compiler.disable
    def _records(self) -> list[FloraHyperParams]:
        """The record of each param group (``hyperparams.from_group``), the same object while the
        group's options are unchanged (a scheduler's ``lr`` makes a new one). Built outside any
        ``torch.compile`` graph (one graph break at the top of the step, not one per group), and
        kept, so that a compiled step's guards on it hold from step to step."""
        records = []
        for index, group in enumerate(self.param_groups):
            values = tuple(group[key] for key in DEFAULTS)
            cached = self._record_cache.get(index)
            if cached is None or cached[0] != values:
                cached = (values, from_group(group))
                self._record_cache[index] = cached
            records.append(cached[1])
        return records

    @staticmethod
    def _groupable(param: torch.Tensor, grad: torch.Tensor) -> bool:
        """Tensors the grouped step takes; the others (errors, empty, meta/fake) go per tensor."""
        return (
            not grad.is_sparse
            and not grad.is_complex()
            and not param.is_complex()
            and grad.shape == param.shape
            and param.numel() > 0
            and param.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64)
            and not _is_symbolic(param)
            and not is_dtensor(param)  # FSDP2 shards step per tensor (flora_opt.distributed)
        )

    @torch.no_grad()
    def step_param(self, param: torch.Tensor) -> None:
        """Update one parameter from its ``.grad`` now, exactly as :meth:`step` would update it.

        Used by layer-wise updates (:mod:`flora_opt.accumulation`), which step each tensor inside
        backward as soon as its gradient is complete. Does nothing if ``param.grad`` is None.
        Finds the parameter in O(1) (an index kept by :meth:`add_param_group`).
        """
        entry = self._positions.get(param)
        if entry is None or not self._entry_current(param, entry):
            self._reindex()  # param_groups were edited by hand
            entry = self._positions.get(param)
        if entry is None:
            raise ValueError(f"step_param: the parameter of shape {tuple(param.shape)} is not in this optimizer")
        group_index, _, position = entry
        if param in self._engine.counters:
            self._engine.synchronize([param], drop=True)
        if param.grad is not None:
            group = self.param_groups[group_index]
            self._update_param(param, param.grad, group, from_group(group), position)

    def _entry_current(self, param: torch.Tensor, entry: tuple[int, int, int]) -> bool:
        group_index, index, _ = entry
        if group_index >= len(self.param_groups):
            return False
        params = self.param_groups[group_index]["params"]
        return index < len(params) and params[index] is param

    def _update_param(self, param: torch.Tensor, grad: torch.Tensor, group, hp: FloraHyperParams, position: int):
        if grad.is_sparse:
            raise RuntimeError(f"Flora does not support sparse gradients (parameter of shape {tuple(param.shape)})")
        if grad.is_complex() or param.is_complex():
            raise RuntimeError(f"Flora does not support complex gradients (parameter of shape {tuple(param.shape)})")
        if grad.shape != param.shape:
            raise RuntimeError(
                f"gradient shape {tuple(grad.shape)} does not match parameter shape {tuple(param.shape)}"
            )
        layout = self._layout(param, hp)
        if is_dtensor(param):  # FSDP2 / DTensor: the same core on global DTensor operands
            distributed.check_supported(param, group["quantization"])
        state = self.state[param]
        if "step" not in state:
            state = self._init_state(param, layout, group, position)
        if param.numel() == 0:
            state["step"] += 1
            return
        self._check_state(param, state, layout, group["quantization"], position)
        ops = distributed.dtensor_ops(param, layout) if is_dtensor(param) else get_ops("torch")
        work_shape = layout.work_shape
        grad32 = grad.to(torch.float32).reshape(work_shape)
        in_place = param.dtype == torch.float32 and param.is_contiguous()
        param32 = param.view(work_shape) if in_place else param.to(torch.float32).reshape(work_shape)
        step = state["step"] + 1
        compressed = layout.momentum == core.MOMENTUM_COMPRESSED
        projection_index = core.next_projection_index(state[PROJECTION], step, hp.kappa) if compressed else None
        shapes = layout.state_shapes()
        quantized = {key: is_quantized_state(layout, key, group["quantization"]) for key in shapes}
        lr = group["lr"]
        new_values, direction, finite = core.flora_update(
            grad32,
            param32,
            {key: read_state([state], key, shape, quantized[key]) for key, shape in shapes.items()},
            step,
            state["seed"],
            layout,
            hp,
            ops,
            lr=None if lr is None else float(lr),
            device=param.device,
            projection_index=projection_index,
        )
        if not _is_symbolic(param) and not bool(finite):
            state["skipped_steps"] += 1
            warnings.warn(
                f"Flora: non-finite gradient for a parameter of shape {tuple(param.shape)}; "
                "its update was skipped (parameter and state unchanged)",
                RuntimeWarning,
                stacklevel=3,
            )
            return
        state["step"] = step
        if compressed:
            state[PROJECTION] = projection_index
        if is_dtensor(param):
            new_values = distributed.place_state(param, layout, new_values)
        for key, value in new_values.items():
            write_state([state], key, value, quantized[key])
        if in_place or param.dtype != torch.float64:
            # float32, or bf16/fp16: applied in float32, then rounded once to the parameter dtype
            core.apply_direction_([param32], direction, ops)
            if not in_place:
                param.copy_(param32.view(param.shape))
            return
        # float64: the update is computed in float32 but applied in float64, so the parameter
        # keeps its precision (lr=0 leaves it bit-identical)
        del param32
        target = param.view(work_shape) if param.is_contiguous() else param.reshape(work_shape).clone()
        core.apply_direction_([target], direction, ops)
        if not param.is_contiguous():
            param.copy_(target.view(param.shape))

    def _check_state(self, param, state, layout: TensorLayout, quantization: bool, position: int) -> None:
        expected = _expected_state(layout, quantization, is_dtensor(param))
        for key, (shape, _dtype) in expected.items():
            value = state.get(key)
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape:
                got = None if not isinstance(value, torch.Tensor) else tuple(value.shape)
                raise RuntimeError(
                    f"Flora state for parameter {position} (shape {tuple(param.shape)}) does not fit its "
                    f"options: {key!r} should have shape {shape}, found {got}. Was the state created with a "
                    "different rank, beta1, quantization or factorize_second_moment?"
                )

    # ---- checkpoints ----------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict, validating it first (on error nothing changes); state dtypes are kept.

        * A state dict that is not this package's Flora state (AdamW, Adafactor, SGD, or the
          reference ``flora-opt==0.0.3``, whose seeds are ``torch.Generator`` seeds) is refused with
          a ``ValueError`` that says what it looks like: its momentum cannot be decompressed here.
        * Saved group options win, as in torch, except those that decide the state layout
          (``rank``, ``quantization``, ``factorize_second_moment``, ``min_dim_size_to_factor``,
          ``max_aspect_ratio``, momentum on/off): if the constructor's differ from the
          checkpoint's, a ``ValueError`` names the option and both values.
        * Hand-edited or damaged per-parameter state (negative ``step``, missing ``seed``, wrong
          shapes) raises a ``ValueError`` naming the parameter and the key.

        The steps of ``torch.optim.Optimizer.load_state_dict``, in its order: the registered
        pre-hooks first (they may adapt the dict before it is checked), then the check and the
        load, then the post-hooks (they see the loaded state). Unlike it, floating state is not
        cast to the parameter dtype (for bf16/fp16 parameters that would silently downcast the
        fp32, possibly compressed, state): the saved tensors are copied as they are, to the
        parameter's device.
        """
        self._engine.synchronize(drop=True)
        if isinstance(state_dict, dict):
            state_dict = dict(state_dict)  # shallow, as torch.optim: a pre-hook may replace keys
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
            raise ValueError("not an optimizer state dict: expected a dict with 'state' and 'param_groups'")
        saved_groups = state_dict["param_groups"]
        saved_state = state_dict["state"]
        foreign = _foreign_state_message(state_dict)
        if foreign is not None:
            raise ValueError(foreign)
        version = state_dict.get(FORMAT_KEY)
        if version is not None and (not is_int(version) or not 1 <= version <= STATE_FORMAT):
            raise ValueError(
                f"the checkpoint has {FORMAT_KEY}={version!r}; this flora-opt reads formats 1 to {STATE_FORMAT}: "
                "it was written by a newer flora-opt (upgrade it) or is not a Flora checkpoint"
            )
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"loaded state dict has {len(saved_groups)} parameter groups, "
                f"the optimizer has {len(self.param_groups)}"
            )
        pairs = []
        disagreements = []
        for group_index, (group, saved) in enumerate(zip(self.param_groups, saved_groups, strict=True)):
            if len(group["params"]) != len(saved["params"]):
                raise ValueError(
                    f"loaded state dict group {group_index} has {len(saved['params'])} parameters, "
                    f"the optimizer's has {len(group['params'])}"
                )
            options = {key: saved.get(key, DEFAULTS[key]) for key in DEFAULTS}
            validate_group(options)
            for key, decides in LAYOUT_OPTIONS.items():
                mine, theirs = group[key], options[key]
                if decides(mine) != decides(theirs):
                    disagreements.append(
                        f"group {group_index} was saved with {key}={theirs!r} but this optimizer was built with "
                        f"{key}={mine!r}"
                    )
            hp = from_group(options)
            for param, saved_id in zip(group["params"], saved["params"], strict=True):
                pairs.append((param, saved_id, hp, options["quantization"]))
        for position, (param, saved_id, hp, quantization) in enumerate(pairs):
            if saved_id not in saved_state:
                continue
            entry = saved_state[saved_id]
            _check_saved_entry(entry, position, version is not None)
            layout = core.tensor_layout(param.shape, hp)
            if param.numel() == 0:
                continue
            expected = _expected_state(layout, quantization, is_dtensor(param))
            for key, (shape, dtype) in expected.items():
                value = entry.get(key)
                if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape or value.dtype != dtype:
                    got = None if not isinstance(value, torch.Tensor) else (tuple(value.shape), value.dtype)
                    raise ValueError(
                        f"cannot load Flora state for parameter {position} of shape {tuple(param.shape)}: "
                        f"{key!r} should be {shape} {dtype} under rank={hp.rank}, quantization={quantization}, "
                        f"found {got}"
                    )
        if disagreements:
            raise ValueError(
                "the checkpoint's state layout differs from this optimizer's: "
                + "; ".join(disagreements)
                + ". Construct Flora with the checkpoint's options to resume (saved options win, as in "
                "torch.optim, but these decide the shape of the state), or start the optimizer fresh"
            )
        loaded_ids = set()
        state: collections.defaultdict[Any, dict] = collections.defaultdict(dict)
        for param, saved_id, hp, _ in pairs:
            loaded_ids.add(saved_id)
            if saved_id not in saved_state:
                continue
            entry = {
                key: value.to(device=param.device, copy=True)
                if isinstance(value, torch.Tensor)
                else copy.deepcopy(value)
                for key, value in saved_state[saved_id].items()
            }
            compressed = core.tensor_layout(param.shape, hp).momentum == core.MOMENTUM_COMPRESSED
            if compressed and PROJECTION not in entry:  # format 1: it was floor((step - 1) / kappa)
                entry[PROJECTION] = core.constant_kappa_index(entry["step"], hp.kappa)
            state[param] = entry
        for key, value in saved_state.items():  # state of no parameter is kept as it is, as torch.optim does
            if key not in loaded_ids:
                state[key] = value
        param_groups = []
        for group, saved in zip(self.param_groups, copy.deepcopy(saved_groups), strict=True):
            saved["params"] = group["params"]
            if "param_names" in group and "param_names" not in saved:
                saved["param_names"] = group["param_names"]
            param_groups.append(saved)
        self.__setstate__({"state": state, "param_groups": param_groups})
        for group in self.param_groups:
            normalize_group(group)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)


def _foreign_state_message(state_dict: dict[str, Any]) -> str | None:
    """What a state dict that is not this package's Flora state looks like (None if it is ours)."""
    groups = state_dict["param_groups"]
    entries = [entry for entry in state_dict["state"].values() if isinstance(entry, dict)]
    group_keys = set().union(*(set(group) for group in groups)) if groups else set()
    state_keys = set().union(*(set(entry) for entry in entries)) if entries else set()
    what = None
    if "betas" in group_keys or "amsgrad" in group_keys:
        what = "torch.optim.Adam/AdamW's"
    elif "momentum" in group_keys and "dampening" in group_keys:
        what = "torch.optim.SGD's"
    elif "RMS" in state_keys or ({"scale_parameter", "relative_step"} <= group_keys and "kappa" not in group_keys):
        what = "transformers.Adafactor's"
    if what is not None:
        return (
            f"this is not a Flora state dict (it looks like {what}): its state cannot be converted into "
            "Flora's compressed momentum and factored statistics. Load only the model weights and start "
            "Flora fresh"
        )
    if groups and not {"rank", "kappa"} <= group_keys:
        missing = sorted({"rank", "kappa"} - group_keys)
        return f"this is not a Flora state dict: its param groups lack {', '.join(map(repr, missing))}"
    if FORMAT_KEY not in state_dict and any("skipped_steps" not in entry for entry in entries):
        return (
            "this looks like a checkpoint of the reference flora-opt 0.0.3 (Flora param groups, but "
            f"per-parameter state without 'skipped_steps' and no {FORMAT_KEY!r} key): its 'seed' is a "
            "torch.Generator seed, not this package's per-tensor projection seed, so its compressed momentum "
            "would be decompressed with an unrelated projection (and its defaults rank=None, beta1=None "
            "differ from ours). Load only the model weights and start Flora fresh"
        )
    return None


def _check_saved_entry(entry, position: int, has_format: bool) -> None:
    """Integers of one parameter's saved state (hand-edited or damaged state is refused)."""
    if not isinstance(entry, dict):
        raise ValueError(f"Flora state for parameter {position} must be a dict, got {type(entry).__name__}")
    required = ("step", "seed", "skipped_steps") if has_format else ("step", "seed")
    for key in required:
        if key not in entry:
            raise ValueError(f"Flora state for parameter {position}: {key!r} is missing")
    for key in ("step", "skipped_steps", PROJECTION):
        if key in entry and (not is_int(entry[key]) or entry[key] < 0):
            raise ValueError(f"Flora state for parameter {position}: {key!r} must be an int >= 0, got {entry[key]!r}")
    seed = entry["seed"]
    if not is_int(seed) or not 0 <= seed < 2**32:
        raise ValueError(f"Flora state for parameter {position}: 'seed' must be an int in [0, 2**32), got {seed!r}")
    if PROJECTION in entry and entry[PROJECTION] > max(entry["step"] - 1, 0):
        raise ValueError(
            f"Flora state for parameter {position}: {PROJECTION!r} must be <= step - 1 "
            f"({max(entry['step'] - 1, 0)}), got {entry[PROJECTION]!r}"
        )

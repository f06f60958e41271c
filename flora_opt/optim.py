r"""``flora_opt.Flora``: the Flora optimizer for PyTorch, a thin wrapper over :mod:`flora_opt.core`.

.. math::
   \begin{aligned}
   &\eta_t = \rho_t \max(\epsilon_2, \mathrm{RMS}(W_{t-1})), \quad
     \rho_t = \text{lr or } \min(10^{-2}, 1/\sqrt t) \\
   &\hat V_t:\ \text{Adafactor's factored (or full) second moment of } G_t, \quad
     \beta_{2,t} = 1 - t^{\text{decay\_rate}} \\
   &U_t = G_t / \sqrt{\hat V_t}, \qquad U_t \leftarrow U_t / \max(1, \mathrm{RMS}(U_t)/d) \\
   &P_k \in \mathbb R^{r\times \min(m,n)},\ (P_k)_{ij}\sim\mathcal N(0, 1/r),
     \ k = \lfloor (t-1)/\kappa \rfloor \text{ (regenerated from a seed)} \\
   &\text{if } t>1,\ (t-1) \bmod \kappa = 0:\ M \leftarrow P_k P_{k-1}^\top M \\
   &M_t = \beta_1 M_{t-1} + (1-\beta_1)\,\eta_t P_k U_t, \qquad
     W_t = W_{t-1} - \eta_t \lambda W_{t-1} - P_k^\top M_t
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

import math
import warnings
from typing import Any, Callable, Iterable

import torch

from . import core
from . import quantization as q
from .core import EXP_AVG, EXP_AVG_SQ, FloraHyperParams, TensorLayout
from .ops import get_ops
from .projection import tensor_seed
from .statebytes import is_quantized

__all__ = ["Flora"]

_SIGNED = {EXP_AVG: True, EXP_AVG_SQ: False}
CODES_SUFFIX = "_codes"
ABSMAX_SUFFIX = "_absmax"
_INT_STATE_KEYS = ("step", "seed", "skipped_steps")

_DEFAULTS: dict[str, Any] = dict(
    lr=None,
    rank=256,
    kappa=1000,
    eps=(1e-30, 1e-3),
    clip_threshold=1.0,
    decay_rate=-0.8,
    beta1=0.9,
    weight_decay=0.0,
    scale_parameter=True,
    relative_step=False,
    warmup_init=False,
    factorize_second_moment=True,
    min_dim_size_to_factor=128,
    max_aspect_ratio=4.0,
    seed=0,
    quantization=False,
)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _validate_group(options: dict[str, Any]) -> None:
    """Raise ValueError naming the argument and the bad value (torch.optim style)."""
    lr = options["lr"]
    if options["relative_step"]:
        if lr is not None:
            raise ValueError(
                f"Invalid lr: {lr!r}: lr must be None when relative_step=True "
                "(the step size is then min(1e-2, 1/sqrt(t)), scaled by the parameter RMS)"
            )
    else:
        if lr is None:
            raise ValueError("Invalid lr: None: pass a learning rate, or set relative_step=True")
        if isinstance(lr, torch.Tensor):
            if lr.numel() != 1:
                raise ValueError(f"Invalid lr: a tensor lr must have one element, got shape {tuple(lr.shape)}")
            lr_value = float(lr)
        elif isinstance(lr, (int, float)) and not isinstance(lr, bool):
            lr_value = float(lr)
        else:
            raise ValueError(f"Invalid lr: {lr!r}: expected a float")
        if not lr_value >= 0.0 or math.isinf(lr_value):
            raise ValueError(f"Invalid lr: {lr!r}: must be a finite float >= 0")
    if options["warmup_init"] and not options["relative_step"]:
        raise ValueError("Invalid warmup_init: True requires relative_step=True")
    rank = options["rank"]
    if rank is not None and (not _is_int(rank) or rank < 1):
        raise ValueError(f"Invalid rank: {rank!r}: must be an int >= 1, or None for full momentum")
    kappa = options["kappa"]
    if not _is_int(kappa) or kappa < 1:
        raise ValueError(f"Invalid kappa: {kappa!r}: must be an int >= 1")
    eps = options["eps"]
    if (
        not isinstance(eps, (tuple, list))
        or len(eps) != 2
        or not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in eps)
    ):
        raise ValueError(f"Invalid eps: {eps!r}: expected a pair (eps1, eps2) of positive floats")
    for index, value in enumerate(eps):
        if not value > 0.0 or math.isinf(value):
            raise ValueError(f"Invalid eps value at index {index}: {value!r}: must be a finite float > 0")
    clip = options["clip_threshold"]
    if not isinstance(clip, (int, float)) or isinstance(clip, bool) or not clip > 0.0 or math.isinf(clip):
        raise ValueError(f"Invalid clip_threshold: {clip!r}: must be a finite float > 0")
    decay_rate = options["decay_rate"]
    if not isinstance(decay_rate, (int, float)) or isinstance(decay_rate, bool) or not decay_rate < 0.0:
        raise ValueError(f"Invalid decay_rate: {decay_rate!r}: must be a float < 0 (beta2_t = 1 - t^decay_rate)")
    beta1 = options["beta1"]
    if beta1 is not None and (
        not isinstance(beta1, (int, float)) or isinstance(beta1, bool) or not 0.0 <= beta1 < 1.0
    ):
        raise ValueError(f"Invalid beta1: {beta1!r}: must be in [0, 1), or None to disable momentum")
    weight_decay = options["weight_decay"]
    if (
        not isinstance(weight_decay, (int, float))
        or isinstance(weight_decay, bool)
        or not weight_decay >= 0.0
        or math.isinf(weight_decay)
    ):
        raise ValueError(f"Invalid weight_decay: {weight_decay!r}: must be a finite float >= 0")
    for flag in ("scale_parameter", "relative_step", "warmup_init", "factorize_second_moment", "quantization"):
        if not isinstance(options[flag], bool):
            raise ValueError(f"Invalid {flag}: {options[flag]!r}: must be a bool")
    min_dim = options["min_dim_size_to_factor"]
    if not _is_int(min_dim) or min_dim < 1:
        raise ValueError(f"Invalid min_dim_size_to_factor: {min_dim!r}: must be an int >= 1")
    ratio = options["max_aspect_ratio"]
    if ratio is not None and (
        not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not ratio >= 1.0 or math.isinf(ratio)
    ):
        raise ValueError(f"Invalid max_aspect_ratio: {ratio!r}: must be a finite float >= 1, or None")
    seed = options["seed"]
    if not _is_int(seed) or not 0 <= seed < 2**32:
        raise ValueError(f"Invalid seed: {seed!r}: must be an int in [0, 2**32)")


def _hyperparams(group: dict[str, Any]) -> FloraHyperParams:
    lr = group["lr"]
    beta1 = group["beta1"]
    return FloraHyperParams(
        lr=None if lr is None else float(lr),
        rank=group["rank"],
        kappa=group["kappa"],
        eps1=float(group["eps"][0]),
        eps2=float(group["eps"][1]),
        clip_threshold=float(group["clip_threshold"]),
        decay_rate=float(group["decay_rate"]),
        beta1=None if not beta1 else float(beta1),
        weight_decay=float(group["weight_decay"]),
        scale_parameter=group["scale_parameter"],
        relative_step=group["relative_step"],
        warmup_init=group["warmup_init"],
        factorize_second_moment=group["factorize_second_moment"],
        min_dim_size_to_factor=group["min_dim_size_to_factor"],
        max_aspect_ratio=None if group["max_aspect_ratio"] is None else float(group["max_aspect_ratio"]),
    )


class Flora(torch.optim.Optimizer):
    r"""Flora: Adafactor with momentum compressed by regenerated Gaussian projections.

    A drop-in replacement for ``torch.optim.AdamW`` / ``transformers.Adafactor``: for an
    ``m x n`` weight the momentum costs ``r * max(m, n)`` floats instead of ``m * n``, and the
    second moment ``m + n`` (Adafactor's factored statistics). The projections are never
    stored: each is regenerated from an integer seed in the state (docs/algorithm.md).

    Args:
      params: iterable of tensors or of param-group dicts (every option below can be set
        per group, e.g. ``{"params": embeddings, "rank": None}``).
      lr (float): learning rate ``rho``; required unless ``relative_step=True``.
      rank (int or None, default 256): projection rank ``r``. A tensor whose smaller matrix
        dimension is ``<= rank`` keeps full momentum; ``None`` keeps full momentum everywhere
        (the paper's uncompressed baseline: Adafactor with momentum).
      kappa (int, default 1000): resample the momentum projection every ``kappa`` steps,
        transferring the momentum ``M <- P_new P_old^T M``.
      eps (tuple, default (1e-30, 1e-3)): ``eps1`` added to squared gradients, ``eps2`` the
        floor of the parameter RMS in ``scale_parameter``.
      clip_threshold (float, default 1.0): update clipping threshold ``d``.
      decay_rate (float, default -0.8): ``beta2_t = 1 - t^decay_rate``.
      beta1 (float or None, default 0.9): momentum coefficient; ``None`` or ``0`` disables
        momentum (then Flora is exactly Adafactor and keeps no momentum state).
      weight_decay (float, default 0.0): decoupled weight decay ``p <- p - eta_t * wd * p``.
      scale_parameter (bool, default True): scale the step by ``max(eps2, RMS(p))``.
      relative_step (bool, default False): ``rho_t = min(1e-2, 1/sqrt(t))`` instead of ``lr``.
      warmup_init (bool, default False): ``rho_t = min(1e-6 t, 1/sqrt(t))``; needs
        ``relative_step``.
      factorize_second_moment (bool, default True): Adafactor's factored second moment for
        matrices; ``False`` keeps a full (Adam-like) second moment.
      min_dim_size_to_factor (int, default 128): factor only matrices whose smaller dimension
        is at least this (as optax's Adafactor).
      max_aspect_ratio (float or None, default 4.0): matrices with ``max(m, n) > ratio *
        min(m, n)`` (token embeddings, LM heads) keep full momentum, as in the reference code;
        ``None`` compresses them too.
      seed (int, default 0): seed of the projections (32-bit).
      quantization (bool, default False): store the momentum (compressed or not) and any full
        second moment in 8 bits, blockwise (256) with the dynamic-tree code, via torchao.

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
      poisoning it. See docs/algorithm.md, "Deviations".
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], lr: float | None = None, **kwargs):
        unknown = sorted(set(kwargs) - set(_DEFAULTS))
        if unknown:
            raise TypeError(
                f"Flora.__init__() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; "
                f"valid options: {', '.join(_DEFAULTS)}"
            )
        defaults = dict(_DEFAULTS)
        defaults.update(kwargs)
        defaults["lr"] = lr
        if isinstance(defaults["eps"], list):
            defaults["eps"] = tuple(defaults["eps"])
        _validate_group(defaults)
        self._layout_cache: dict[tuple, TensorLayout] = {}
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        unknown = sorted(set(param_group) - set(_DEFAULTS) - {"params", "name"})
        if unknown:
            raise TypeError(
                f"Flora param group got unexpected option(s) {', '.join(map(repr, unknown))}; "
                f"valid options: {', '.join(_DEFAULTS)}"
            )
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if isinstance(group["eps"], list):
            group["eps"] = tuple(group["eps"])
        _validate_group(group)
        for param in group["params"]:
            if param.is_complex():
                raise ValueError(f"Flora does not support complex parameters (shape {tuple(param.shape)})")

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._layout_cache = {}
        for group in self.param_groups:
            for key, value in _DEFAULTS.items():
                group.setdefault(key, value)

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

    @staticmethod
    def _quantized(layout: TensorLayout, key: str, quantization: bool) -> bool:
        return is_quantized(key, math.prod(layout.state_shapes()[key]), quantization)

    def _expected_state(self, layout: TensorLayout, quantization: bool) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        expected: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for key, shape in layout.state_shapes().items():
            if self._quantized(layout, key, quantization):
                blocks = q.num_blocks(math.prod(shape))
                expected[key + CODES_SUFFIX] = ((blocks * q.BLOCK_SIZE,), torch.uint8)
                expected[key + ABSMAX_SUFFIX] = ((blocks,), torch.float32)
            else:
                expected[key] = (shape, torch.float32)
        return expected

    def _init_state(self, param: torch.Tensor, layout: TensorLayout, group: dict[str, Any], index: int) -> dict:
        message = core.unstable_transfer_message(layout, _hyperparams(group))
        if message is not None:
            warnings.warn(message, RuntimeWarning, stacklevel=4)
        state = self.state[param]
        state["step"] = 0
        state["seed"] = tensor_seed(group["seed"], index)
        state["skipped_steps"] = 0
        for key, shape in layout.state_shapes().items():
            if self._quantized(layout, key, group["quantization"]):
                codes, absmax = q.zeros(shape, param.device)
                state[key + CODES_SUFFIX] = codes
                state[key + ABSMAX_SUFFIX] = absmax
            else:
                state[key] = torch.zeros(shape, dtype=torch.float32, device=param.device)
        return state

    def _read_state(self, state, layout: TensorLayout, quantization: bool) -> dict[str, torch.Tensor]:
        values = {}
        for key, shape in layout.state_shapes().items():
            if self._quantized(layout, key, quantization):
                values[key] = q.dequantize(state[key + CODES_SUFFIX], state[key + ABSMAX_SUFFIX], shape, _SIGNED[key])
            else:
                values[key] = state[key]
        return values

    def _write_state(self, state, new_values: dict[str, torch.Tensor], layout: TensorLayout, quantization: bool):
        for key, value in new_values.items():
            if self._quantized(layout, key, quantization):
                # written into the existing buffers: no second copy of the codes
                q.quantize(value, _SIGNED[key], out=(state[key + CODES_SUFFIX], state[key + ABSMAX_SUFFIX]))
            else:
                state[key] = value

    def state_bytes(self) -> int:
        """Bytes of all tensors held in the optimizer state (exact)."""
        total = 0
        for state in self.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    total += value.numel() * value.element_size()
        return total

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
        index = 0
        for group in self.param_groups:
            hp = None
            for param in group["params"]:
                position = index
                index += 1
                if param.grad is None:
                    continue
                if hp is None:
                    hp = _hyperparams(group)
                self._update_param(param, param.grad, group, hp, position)
        return loss

    @torch.no_grad()
    def step_param(self, param: torch.Tensor) -> None:
        """Update one parameter from its ``.grad`` now, exactly as :meth:`step` would update it.

        Used by layer-wise updates (:mod:`flora_opt.layerwise`), which step each tensor inside
        backward as soon as its gradient is complete. Does nothing if ``param.grad`` is None.
        """
        index = 0
        for group in self.param_groups:
            for candidate in group["params"]:
                if candidate is param:
                    if param.grad is not None:
                        self._update_param(param, param.grad, group, _hyperparams(group), index)
                    return
                index += 1
        raise ValueError(f"step_param: the parameter of shape {tuple(param.shape)} is not in this optimizer")

    def _update_param(self, param: torch.Tensor, grad: torch.Tensor, group, hp: FloraHyperParams, position: int):
        if grad.is_sparse:
            raise RuntimeError(f"Flora does not support sparse gradients (parameter of shape {tuple(param.shape)})")
        if grad.is_complex() or param.is_complex():
            raise RuntimeError(f"Flora does not support complex gradients (parameter of shape {tuple(param.shape)})")
        if grad.shape != param.shape:
            raise RuntimeError(f"gradient shape {tuple(grad.shape)} does not match parameter shape {tuple(param.shape)}")
        layout = self._layout(param, hp)
        state = self.state[param]
        if "step" not in state:
            state = self._init_state(param, layout, group, position)
        if param.numel() == 0:
            state["step"] += 1
            return
        self._check_state(param, state, layout, group["quantization"], position)
        ops = get_ops("torch")
        work_shape = layout.work_shape
        grad32 = grad.to(torch.float32).reshape(work_shape)
        in_place = param.dtype == torch.float32 and param.is_contiguous()
        param32 = param.view(work_shape) if in_place else param.to(torch.float32).reshape(work_shape)
        step = state["step"] + 1
        lr = group["lr"]
        new_values, direction, finite = core.flora_update(
            grad32,
            param32,
            self._read_state(state, layout, group["quantization"]),
            step,
            state["seed"],
            layout,
            hp,
            ops,
            lr=None if lr is None else float(lr),
            device=param.device,
        )
        if not bool(finite):
            state["skipped_steps"] += 1
            warnings.warn(
                f"Flora: non-finite gradient for a parameter of shape {tuple(param.shape)}; "
                "its update was skipped (parameter and state unchanged)",
                RuntimeWarning,
                stacklevel=3,
            )
            return
        state["step"] = step
        self._write_state(state, new_values, layout, group["quantization"])
        if direction.decay is not None:
            param32.mul_(1.0 - direction.decay)
        if direction.kind == "dense":
            param32.sub_(direction.value)
        elif direction.kind == core.SIDE_ROWS:
            param32.addmm_(direction.projection.mT, direction.value, alpha=-1.0)
        else:
            param32.addmm_(direction.value, direction.projection, alpha=-1.0)
        if not in_place:
            param.copy_(param32.view(param.shape))

    def _check_state(self, param, state, layout: TensorLayout, quantization: bool, position: int) -> None:
        expected = self._expected_state(layout, quantization)
        for key, (shape, dtype) in expected.items():
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
        """Load a state dict, validating shapes and keeping state dtypes as saved.

        ``torch.optim.Optimizer.load_state_dict`` casts floating state to the parameter dtype;
        for bf16/fp16 parameters that would silently downcast the fp32 (possibly compressed)
        state, so the saved tensors are restored as they were, on the parameter's device.
        """
        saved_groups = state_dict["param_groups"]
        saved_state = state_dict["state"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"loaded state dict has {len(saved_groups)} parameter groups, the optimizer has {len(self.param_groups)}"
            )
        pairs = []
        for group_index, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(group["params"]) != len(saved["params"]):
                raise ValueError(
                    f"loaded state dict group {group_index} has {len(saved['params'])} parameters, "
                    f"the optimizer's has {len(group['params'])}"
                )
            options = {key: saved.get(key, _DEFAULTS[key]) for key in _DEFAULTS}
            _validate_group(options)
            hp = _hyperparams(options)
            for param, saved_id in zip(group["params"], saved["params"]):
                pairs.append((param, saved_id, hp, options["quantization"]))
        for position, (param, saved_id, hp, quantization) in enumerate(pairs):
            if saved_id not in saved_state:
                continue
            entry = saved_state[saved_id]
            for key in _INT_STATE_KEYS:
                if key in entry and not _is_int(entry[key]):
                    raise ValueError(f"Flora state for parameter {position}: {key!r} must be an int, got {entry[key]!r}")
            layout = core.tensor_layout(param.shape, hp)
            if param.numel() == 0:
                continue
            expected = self._expected_state(layout, quantization)
            for key, (shape, dtype) in expected.items():
                value = entry.get(key)
                if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape or value.dtype != dtype:
                    got = None if not isinstance(value, torch.Tensor) else (tuple(value.shape), value.dtype)
                    raise ValueError(
                        f"cannot load Flora state for parameter {position} of shape {tuple(param.shape)}: "
                        f"{key!r} should be {shape} {dtype} under rank={hp.rank}, quantization={quantization}, "
                        f"found {got}"
                    )
        super().load_state_dict(state_dict)
        for param, saved_id, _, _ in pairs:
            if saved_id not in saved_state:
                continue
            state = self.state[param]
            for key, value in saved_state[saved_id].items():
                if isinstance(value, torch.Tensor):
                    state[key] = value.to(device=param.device, copy=True)
        self._layout_cache = {}

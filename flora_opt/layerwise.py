"""Layer-wise updates fused into backward (LOMO-style), for any per-tensor torch optimizer.

Each parameter is updated by its optimizer from a post-accumulate-grad hook as soon as its gradient
for the cycle is complete, and its ``.grad`` is freed right away, so at most a few full-size
gradients exist at any time instead of one per parameter. The hooks live in
:class:`flora_opt.accumulation.CompressedAccumulator` (shared with compressed accumulation and
:class:`flora_opt.FloraAccelerator`); this module holds the single-tensor step and the plain-PyTorch
entry point :func:`enable_layerwise_updates`.

Layer-wise stepping is exact for optimizers whose update of one tensor depends only on that
tensor's gradient and state: SGD, Adam(W), Adafactor, :class:`flora_opt.Flora` and most others. It
is wrong for optimizers that couple tensors (e.g. LAMB-style global trust ratios, Shampoo over
several tensors, or anything reading all gradients in ``step``).
"""

from __future__ import annotations

import torch

__all__ = ["enable_layerwise_updates", "step_parameter", "unwrap_optimizer"]


def unwrap_optimizer(optimizer):
    """The optimizer under accelerate's ``AcceleratedOptimizer`` wrapper(s), if any."""
    try:
        from accelerate.optimizer import AcceleratedOptimizer
    except ImportError:  # accelerate is optional for the plain-PyTorch API
        return optimizer
    while isinstance(optimizer, AcceleratedOptimizer):
        optimizer = optimizer.optimizer
    return optimizer


def optimizer_group_index(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> int:
    """Index of the param group holding ``param``."""
    for index, group in enumerate(optimizer.param_groups):
        if any(candidate is param for candidate in group["params"]):
            return index
    raise ValueError(f"the parameter of shape {tuple(param.shape)} is not in this optimizer")


@torch.no_grad()
def step_parameter(optimizer: torch.optim.Optimizer, param: torch.Tensor, group_index: int | None = None) -> None:
    """Apply ``optimizer`` to ``param`` alone, from ``param.grad``, as ``optimizer.step()`` would.

    Uses the optimizer's ``step_param(param)`` when it has one (:class:`flora_opt.Flora`, whose
    projection seeds depend on the tensor's position). Otherwise it runs ``optimizer.step()`` with
    the optimizer temporarily restricted to ``param``'s group holding only ``param``; per-tensor
    state (``optimizer.state[param]``) and the group's options (lr from a scheduler, ...) are used
    as in a full step.
    """
    step_param = getattr(optimizer, "step_param", None)
    if callable(step_param):
        step_param(param)
        return
    if group_index is None:
        group_index = optimizer_group_index(optimizer, param)
    groups = optimizer.param_groups
    group = groups[group_index]
    params = group["params"]
    try:
        group["params"] = [param]
        optimizer.param_groups = [group]
        optimizer.step()
    finally:
        group["params"] = params
        optimizer.param_groups = groups


def enable_layerwise_updates(
    optimizer: torch.optim.Optimizer,
    *,
    accumulation_steps: int = 1,
    accumulation_rank: int | None = None,
    seed: int = 0,
    max_grad_norm: float | None = None,
):
    """Update every parameter of ``optimizer`` inside backward, as soon as its gradient is complete.

    Returns the :class:`~flora_opt.accumulation.CompressedAccumulator` that holds the hooks (call
    its ``remove()`` to turn layer-wise updates off). With ``accumulation_steps > 1`` run each
    micro-batch's backward through ``accumulator.backward(loss)`` so the update fires on the last
    micro-batch of each cycle only; ``accumulation_rank`` compresses the accumulation
    (docs/algorithm.md section 12). With ``accumulation_steps=1`` a bare ``loss.backward()`` works.

    Args:
      optimizer: a per-tensor torch optimizer (see the module docstring).
      accumulation_steps (int, default 1): micro-batches per optimizer step.
      accumulation_rank (int or None, default None): rank of compressed accumulation.
      seed (int, default 0): seed of the accumulation projections.
      max_grad_norm (float or None, default None): clip each tensor ``i`` to norm
        ``max_grad_norm * sqrt(numel_i / numel_total)`` before its update, which bounds the
        global norm of the applied gradient by ``max_grad_norm`` (the exact global norm is not
        known until backward ends). ``accumulator.last_grad_norm`` is the pre-clip global norm.

    Example:
      >>> import torch
      >>> from flora_opt.layerwise import enable_layerwise_updates
      >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
      >>> optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
      >>> accumulator = enable_layerwise_updates(optimizer)
      >>> model(torch.randn(16, 64)).pow(2).mean().backward()  # parameters updated here
      >>> all(p.grad is None for p in model.parameters())
      True
      >>> optimizer.step()  # nothing left to update; still safe to call
    """
    from .accumulation import CompressedAccumulator

    return CompressedAccumulator(
        optimizer,
        accumulation_rank,
        accumulation_steps=accumulation_steps,
        seed=seed,
        layerwise=True,
        max_grad_norm=max_grad_norm,
    )

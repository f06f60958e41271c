"""Import path kept for existing code: layer-wise updates live in :mod:`flora_opt.accumulation`.

``enable_layerwise_updates`` (also ``flora_opt.enable_layerwise_updates``), ``step_parameter``
and ``unwrap_optimizer`` are defined there, next to the hooks that use them, so the two modules
no longer import each other.
"""

from .accumulation import enable_layerwise_updates, step_parameter, unwrap_optimizer

__all__ = ["enable_layerwise_updates", "step_parameter", "unwrap_optimizer"]

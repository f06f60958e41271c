"""flora_opt (the ``flora-optim`` distribution): Flora (Hao, Cao and Mou, ICML 2024) for PyTorch and JAX.

``import flora_opt`` needs neither framework; the framework-specific names are loaded on first
use and raise an ImportError naming the extra to install when their framework is missing:

* ``flora_opt.Flora``: the PyTorch optimizer (``pip install 'flora-optim[torch]'``).
* ``flora_opt.FloraAccelerator``: accelerate integration (``pip install 'flora-optim[torch]'``).
* ``flora_opt.CompressedAccumulator``, ``flora_opt.enable_layerwise_updates``: the same without
  accelerate; ``flora_opt.FloraTrainer``: for ``transformers.Trainer`` (``[hf]``).
* ``flora_opt.optax_flora`` / ``flora_opt.optax``: the optax transformations
  (``pip install 'flora-optim[jax]'``).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "Flora": ("flora_opt.optim", "Flora", "torch", "torch"),
    "FloraAccelerator": ("flora_opt.accelerator", "FloraAccelerator", "torch", "torch"),
    "CompressedAccumulator": ("flora_opt.accumulation", "CompressedAccumulator", "torch", "torch"),
    "enable_layerwise_updates": ("flora_opt.accumulation", "enable_layerwise_updates", "torch", "torch"),
    "FloraTrainer": ("flora_opt.hf", "FloraTrainer", "hf", "transformers"),
    "optax_flora": ("flora_opt.optax", "flora", "jax", "optax"),
}

__all__ = [
    "CompressedAccumulator",
    "Flora",
    "FloraAccelerator",
    "FloraTrainer",
    "__version__",
    "enable_layerwise_updates",
    "optax_flora",
]


def __getattr__(name: str):
    if name in _LAZY:
        module_name, attribute, extra, framework = _LAZY[name]
        try:
            if extra == "hf":  # transformers imports torchao (when installed) on its way
                from .quantization import quiet_torchao_import

                with quiet_torchao_import():
                    module = importlib.import_module(module_name)
            else:
                module = importlib.import_module(module_name)
        except ImportError as error:
            missing = getattr(error, "name", None) or ""
            if missing.split(".")[0] in {"torch", "accelerate", "jax", "jaxlib", "optax", "transformers"}:
                raise ImportError(
                    f"flora_opt.{name} needs {framework} ({error}); install it with: pip install 'flora-optim[{extra}]'"
                ) from error
            raise
        value = getattr(module, attribute)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'flora_opt' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))

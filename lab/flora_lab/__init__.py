"""flora-lab: what the demo, the benchmarks and the replications share, kept out of the library.

The library (``flora_opt``, the ``flora-optim`` distribution) holds the math, the framework
layers, the integrations and the memory estimator. This package, installed from a clone with
``pip install -e . -e lab`` (``make setup`` does it), holds the experiment side and its command,
``flora-lab`` (:mod:`flora_lab.cli`: ``flora-lab demo``, ``flora-lab replicate``):

* :mod:`flora_lab.contenders`: the one registry of optimizers the demo and benchmarks compare;
* :mod:`flora_lab.peer_memory`: the peers' state-bytes formulas and the exact count of a live
  optimizer's state;
* :mod:`flora_lab.demo`: ``flora-lab demo`` and the training loop :func:`flora_lab.demo.train_lm`;
* :mod:`flora_lab.lm`: the small LLaMA-style model :class:`flora_lab.lm.TinyLlama`;
* :mod:`flora_lab.livebytes`: :class:`flora_lab.livebytes.LiveTensorBytes`, exact live bytes;
* :mod:`flora_lab.data`: text corpora (bundled Shakespeare sample, Shakespeare, SWORD Bibles),
  tokenizers and LM batches;
* :mod:`flora_lab.replicate`: the paper's two experiments in JAX (``flora-lab replicate``).

Importing the package imports nothing else; ``flora_lab.data`` needs only numpy.
See docs/architecture.md for why the lab is a package of its own.
"""

__version__ = "0.1.0"

"""The two experiments of the Flora paper (Hao, Cao, Mou, ICML 2024, section 5), at CPU scale.

**Momentum** (the paper's Table 1: T5-small trained from scratch): :class:`Seq2Seq` trained from
a random initialisation on KJV -> Reina-Valera verse translation for a fixed number of steps of
``batch_size`` verse pairs, with Adafactor (factored second moment, update clipping 1.0,
``beta2_t = 1 - t^-0.8``, no parameter scaling, learning rate warm-up then cosine decay):

* ``adafactor``: no momentum (``flora_opt.optax.flora(b1=None)``);
* ``adafactor_momentum``: full momentum ``M_t = 0.9 M_{t-1} + 0.1 U_t`` (``flora(b1=0.9, tau=None)``);
* ``lora`` at rank ``r``: the block kernels frozen at their random initialisation, trained
  ``W0 + A B`` (:func:`model.lora_split`; embedding and norms trained), Adafactor with full
  momentum on the trained leaves (the paper's LoRA baseline);
* ``flora`` at rank ``r``: Adafactor with Flora's compressed momentum (``flora(b1=0.9, tau=r)``,
  resampled every ``kappa`` steps).

**Accumulation** (the paper's Table 2: a pretrained T5-3B fine-tuned with batch 1 and 16
accumulation steps): the model is first pretrained by denoising KJV and Reina-Valera verses (one
checkpoint, cached in ``--out``), then fine-tuned on KJV -> World English Bible (archaic to modern
English) with micro-batches of one verse pair and ``K = 16`` micro-batches per optimizer step,
Adafactor without momentum as the optimizer:

* ``naive``: a full-size float32 buffer (``compressed_accumulator(tau=None)``, ``optax.MultiSteps``' sum);
* ``lora`` at rank ``r``: adapters only (embedding frozen; norms trained), naive accumulation;
* ``flora`` at rank ``r``: compressed accumulation with the library's default estimator
  (``compressed_accumulator(tau=r)``: ``B = Q^T S``, ``(r, n)`` or ``(m, r)`` per matrix, of the
  running sum ``S`` on a basis ``Q`` tracked through the micro-batches), expanded once per step;
* ``flora_gaussian`` at rank ``r``: the paper's estimator, ``B = sum_k compress(g_k / K; Q_c)``
  with a fresh Gaussian ``Q_c`` per step (``compressed_accumulator(tau=r, estimator="gaussian")``),
  decompressed once per optimizer step.

Metrics of every run: validation loss (token cross-entropy on held-out verses), SacreBLEU of
greedy decodes of held-out verses, exact optimizer-state bytes and accumulation-buffer bytes
(sum of ``size * itemsize`` over the state's arrays) and XLA's memory analysis of the compiled
train step (``jax.jit(step).lower(...).compile().memory_analysis()``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from flora_opt.optax import compressed_accumulator, flora, state_bytes

from . import tasks
from .model import ModelConfig, Seq2Seq, greedy_decode, lora_merge, lora_split, sequence_loss

__all__ = [
    "ACCUMULATION_KINDS",
    "EXPERIMENTS",
    "FULL",
    "MOMENTUM_KINDS",
    "QUICK",
    "Method",
    "Scale",
    "Workbench",
    "methods_for",
    "run_accumulation",
    "run_momentum",
]

EXPERIMENTS = ("momentum", "accumulation")
MOMENTUM_KINDS = ("adafactor", "adafactor_momentum", "lora", "flora")
ACCUMULATION_KINDS = ("naive", "lora", "flora", "flora_gaussian")


@dataclass(frozen=True)
class Scale:
    """Sizes and budgets of one mode (:data:`FULL`, :data:`QUICK`)."""

    d_model: int
    n_heads: int
    d_ff: int
    layers: int  # encoder layers = decoder layers
    max_len: int  # ids per source/target, bos/eos included
    vocab_size: int  # BPE ids (4 special ids are added)
    ranks: tuple[int, ...]
    batch_size: int  # momentum experiment: pairs per step
    steps: int  # momentum experiment: optimizer steps
    pretrain_batch_size: int
    pretrain_steps: int
    finetune_steps: int  # accumulation experiment: optimizer steps of accum micro-batches
    accum: int
    eval_every: int  # in optimizer steps
    eval_verses: int  # held-out verses in the validation loss (0: all)
    bleu_verses: int  # held-out verses decoded for BLEU
    kappa: int  # Flora's resample interval
    warmup_fraction: float = 0.05
    max_train_pairs: int = 0  # 0: all


FULL = Scale(
    d_model=128,
    n_heads=4,
    d_ff=256,
    layers=2,
    max_len=40,
    vocab_size=2048,
    ranks=(8, 32),
    batch_size=16,
    steps=350,
    pretrain_batch_size=32,
    pretrain_steps=400,
    finetune_steps=30,
    accum=16,
    eval_every=50,
    eval_verses=512,
    bleu_verses=256,
    kappa=100,
)
QUICK = Scale(
    d_model=64,
    n_heads=2,
    d_ff=128,
    layers=1,
    max_len=48,
    vocab_size=1024,
    ranks=(4, 16),
    batch_size=16,
    steps=20,
    pretrain_batch_size=16,
    pretrain_steps=20,
    finetune_steps=4,
    accum=16,
    eval_every=10,
    eval_verses=0,
    bleu_verses=16,
    kappa=20,
)

#: Peak learning rates (before warm-up and cosine decay), chosen with the pilot grid in
#: docs/replication.md ("Learning rates").
DEFAULT_LRS = {
    "momentum": {"adafactor": 1e-2, "adafactor_momentum": 1e-2, "lora": 3e-2, "flora": 1e-2},
    "accumulation": {"naive": 3e-3, "lora": 9e-3, "flora": 3e-3, "flora_gaussian": 3e-3},
    "pretrain": 3e-3,
}


@dataclass(frozen=True)
class Method:
    """One row of an experiment: ``kind`` (see the module docstring) and ``rank`` (lora/flora)."""

    kind: str
    rank: int | None = None

    @property
    def label(self) -> str:
        names = {
            "adafactor": "Adafactor, no momentum",
            "adafactor_momentum": "Adafactor, full momentum",
            "naive": "naive accumulation",
            "lora": "LoRA",
            "flora": "Flora",
            "flora_gaussian": "Flora, Gaussian estimator",
        }
        return names[self.kind] + (f" r={self.rank}" if self.rank is not None else "")

    @property
    def key(self) -> str:
        return self.kind + (str(self.rank) if self.rank is not None else "")


def methods_for(experiment: str, ranks) -> list[Method]:
    """The rows of ``experiment`` at the given ranks, baselines first."""
    if experiment == "momentum":
        base = [Method("adafactor"), Method("adafactor_momentum")]
    elif experiment == "accumulation":
        base = [Method("naive")]
    else:
        raise ValueError(f"Invalid experiment: {experiment!r}: choose from {', '.join(EXPERIMENTS)}")
    methods = base + [Method("lora", r) for r in ranks] + [Method("flora", r) for r in ranks]
    if experiment == "accumulation":
        methods += [Method("flora_gaussian", r) for r in ranks]
    return methods


def _schedule(lr: float, steps: int, warmup_fraction: float):
    warmup = max(1, round(steps * warmup_fraction))
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), end_value=0.1 * lr)


def _adafactor(lr, steps, scale: Scale, *, b1, tau=None, seed=0):
    """Adafactor as ``flora_opt.optax.flora`` (b1=None: no momentum; tau=None: full momentum)."""
    return flora(
        _schedule(lr, steps, scale.warmup_fraction),
        b1=b1,
        tau=tau,
        seed=seed,
        kappa=scale.kappa,
        multiply_by_parameter_scale=False,
    )


def _memory(compiled) -> dict[str, int]:
    stats = compiled.memory_analysis()
    fields = (
        "argument_size_in_bytes",
        "output_size_in_bytes",
        "alias_size_in_bytes",
        "temp_size_in_bytes",
        "generated_code_size_in_bytes",
    )
    out = {f.removesuffix("_size_in_bytes"): int(getattr(stats, f)) for f in fields if stats is not None}
    if out:
        out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


def _param_count(tree) -> int:
    return int(sum(np.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(tree)))


@dataclass
class Workbench:
    """Model, data and compiled evaluation shared by the runs of one experiment."""

    cfg: ModelConfig
    scale: Scale
    tok: object
    train: tasks.TaskData
    val: tasks.TaskData
    eval_batch: int = 128
    model: Seq2Seq = field(init=False)
    compiled: dict = field(init=False, default_factory=dict)  # train steps by (method, lr, steps)

    def __post_init__(self):
        self.model = Seq2Seq(self.cfg)
        model = self.model
        n_eval = len(self.val) if self.scale.eval_verses == 0 else min(self.scale.eval_verses, len(self.val))
        self.eval_src, self.eval_tgt = self._padded(self.val.src[:n_eval], self.val.tgt[:n_eval])
        n_bleu = min(self.scale.bleu_verses, len(self.val))
        self.bleu_src, _ = self._padded(self.val.src[:n_bleu], self.val.tgt[:n_bleu])
        self.bleu_refs = self.val.refs[:n_bleu]

        def loss_sums(params, src, tgt):
            logits = model.apply({"params": params}, src, tgt[:, :-1])
            labels = tgt[:, 1:]
            mask = (labels != 0).astype(jnp.float32)
            logp = jax.nn.log_softmax(logits.astype(jnp.float32))
            nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
            return jnp.sum(nll * mask), jnp.sum(mask)

        bos, eos = tasks.special_id(self.tok, "bos"), tasks.special_id(self.tok, "eos")
        self._loss_sums = jax.jit(loss_sums)
        self._decode = jax.jit(lambda p, s: greedy_decode(model, p, s, bos, eos, self.cfg.max_len - 1))

    def _padded(self, src, tgt):
        n = src.shape[0]
        pad = (-n) % self.eval_batch
        return (
            np.concatenate([src, np.zeros((pad, src.shape[1]), src.dtype)]),
            np.concatenate([tgt, np.zeros((pad, tgt.shape[1]), tgt.dtype)]),
        )

    def init_params(self, seed: int):
        src = jnp.zeros((1, self.cfg.max_len), jnp.int32)
        return self.model.init(jax.random.PRNGKey(seed), src, src[:, :-1])["params"]

    def val_loss(self, params) -> float:
        total, count = 0.0, 0.0
        for i in range(0, self.eval_src.shape[0], self.eval_batch):
            s, c = self._loss_sums(
                params, self.eval_src[i : i + self.eval_batch], self.eval_tgt[i : i + self.eval_batch]
            )
            total, count = total + float(s), count + float(c)
        return total / count

    def bleu(self, params) -> tuple[float, list[str]]:
        import sacrebleu

        hyps = []
        for i in range(0, self.bleu_src.shape[0], self.eval_batch):
            out = np.asarray(self._decode(params, self.bleu_src[i : i + self.eval_batch]))
            hyps.extend(tasks.decode(self.tok, row) for row in out)
        hyps = hyps[: len(self.bleu_refs)]
        return float(sacrebleu.corpus_bleu(hyps, [self.bleu_refs]).score), hyps

    def loss_fn(self, merge):
        model = self.model

        def loss(trainable, frozen, src, tgt):
            return sequence_loss(model, merge(trainable, frozen), src, tgt)

        return loss


def _identity_merge(trainable, frozen):
    return trainable


def _setup_params(bench: Workbench, method: Method, params, seed: int, *, train_rest: bool):
    if method.kind == "lora":
        trainable, frozen = lora_split(params, method.rank, jax.random.PRNGKey(10_000 + seed), train_rest=train_rest)
        return trainable, frozen, lora_merge
    return params, {}, _identity_merge


def _train_order(n: int, rows_per_step: int, steps: int, seed: int) -> np.ndarray:
    """Row indices ``(steps, rows_per_step)``: epochs of a seeded permutation."""
    rng = np.random.default_rng(seed)
    need = steps * rows_per_step
    order = np.concatenate([rng.permutation(n) for _ in range(math.ceil(need / n))])[:need]
    return order.reshape(steps, rows_per_step)


def _finish(bench: Workbench, record: dict, params, t0: float) -> dict:
    record["val_loss"] = bench.val_loss(params)
    record["bleu"], hyps = bench.bleu(params)
    record["samples"] = [{"hyp": h, "ref": r} for h, r in zip(hyps[:3], bench.bleu_refs[:3])]
    record["wall_s"] = time.time() - t0
    return record


def run_momentum(
    bench: Workbench,
    method: Method,
    seed: int,
    lr: float,
    *,
    steps: int,
    advance: Callable[[int], None] = lambda n: None,
) -> dict:
    """One training run of the momentum experiment; returns its record (see the module docstring)."""
    t0 = time.time()
    scale = bench.scale
    params = bench.init_params(seed)
    trainable, frozen, merge = _setup_params(bench, method, params, seed, train_rest=True)
    b1 = None if method.kind == "adafactor" else 0.9
    tau = method.rank if method.kind == "flora" else None
    tx = _adafactor(lr, steps, scale, b1=b1, tau=tau, seed=seed)
    opt_state = tx.init(trainable)
    loss = bench.loss_fn(merge)

    def step(trainable, frozen, opt_state, src, tgt):
        value, grads = jax.value_and_grad(loss)(trainable, frozen, src, tgt)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, value

    order = _train_order(len(bench.train), scale.batch_size, steps, seed)
    src0, tgt0 = bench.train.src[order[0]], bench.train.tgt[order[0]]
    # the seeds live in the state (and the frozen leaves are an argument), so one compiled step
    # serves every seed of a method
    key = ("momentum", method.key, lr, steps)
    if key not in bench.compiled:
        bench.compiled[key] = (
            jax.jit(step, donate_argnums=(0, 2)).lower(trainable, frozen, opt_state, src0, tgt0).compile()
        )
    compiled = bench.compiled[key]
    record = {
        "experiment": "momentum",
        "method": method.key,
        "kind": method.kind,
        "rank": method.rank,
        "label": method.label,
        "seed": seed,
        "lr": lr,
        "steps": steps,
        "batch_size": scale.batch_size,
        "trainable_params": _param_count(trainable),
        "state_bytes": state_bytes(opt_state),
        "momentum_bytes": _momentum_bytes(opt_state),
        "xla": _memory(compiled),
        "curve": [],
        "train_tokens": int(sum(np.count_nonzero(bench.train.tgt[rows][:, 1:]) for rows in order)),
    }
    train_losses = []
    for i, rows in enumerate(order):
        trainable, opt_state, value = compiled(
            trainable, frozen, opt_state, bench.train.src[rows], bench.train.tgt[rows]
        )
        train_losses.append(value)
        advance(1)
        if (i + 1) % scale.eval_every == 0 or i + 1 == steps:
            record["curve"].append(
                [
                    i + 1,
                    bench.val_loss(merge(trainable, frozen)),
                    float(np.mean([float(v) for v in train_losses[-scale.eval_every :]])),
                ]
            )
    return _finish(bench, record, merge(trainable, frozen), t0)


def _momentum_bytes(opt_state) -> int:
    """Bytes of the momentum arrays alone (the ``exp_avg`` fields of ``CompressedEmaState``)."""
    found = optax.tree_utils.tree_get_all_with_path(opt_state, "exp_avg")
    return sum(state_bytes(value) for _, value in found)


def pretrain(
    bench: Workbench,
    denoise: tasks.TaskData,
    *,
    steps: int,
    lr: float,
    cache: Path,
    advance: Callable[[int], None] = lambda n: None,
) -> tuple[dict, dict]:
    """Denoising pretraining (Adafactor with full momentum, seed 0), cached as ``cache``.

    Returns ``(params, info)``; a cache written with other settings is not reused (its file name
    holds a digest of the settings, see :func:`run_replicate`).
    """
    init = bench.init_params(0)
    if cache.exists():
        params = serialization.from_bytes(init, cache.read_bytes())
        advance(steps)
        return params, {"cached": str(cache), "steps": steps, "lr": lr}
    t0 = time.time()
    scale = bench.scale
    tx = _adafactor(lr, steps, scale, b1=0.9)
    opt_state = tx.init(init)
    loss = bench.loss_fn(_identity_merge)

    def step(params, opt_state, src, tgt):
        value, grads = jax.value_and_grad(loss)(params, {}, src, tgt)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    jstep = jax.jit(step, donate_argnums=(0, 1))
    params = init
    order = _train_order(len(denoise), scale.pretrain_batch_size, steps, 0)
    values = []
    for rows in order:
        params, opt_state, value = jstep(params, opt_state, denoise.src[rows], denoise.tgt[rows])
        values.append(value)
        advance(1)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    tmp.write_bytes(serialization.to_bytes(params))
    tmp.replace(cache)
    info = {
        "cached": None,
        "steps": steps,
        "lr": lr,
        "wall_s": time.time() - t0,
        "final_train_loss": float(np.mean([float(v) for v in values[-20:]])),
    }
    return params, info


def run_accumulation(
    bench: Workbench,
    method: Method,
    seed: int,
    lr: float,
    pretrained,
    *,
    steps: int,
    advance: Callable[[int], None] = lambda n: None,
) -> dict:
    """One fine-tuning run of the accumulation experiment (batch 1, ``scale.accum`` micro-batches)."""
    t0 = time.time()
    scale = bench.scale
    k = scale.accum
    pretrained = jax.tree.map(jnp.copy, pretrained)  # the step donates the trained leaves
    trainable, frozen, merge = _setup_params(bench, method, pretrained, seed, train_rest=False)
    if method.kind == "lora":  # adapters and norms; the embedding stays frozen
        norms = {n: v for n, v in trainable["rest"].items() if "norm" in n.split("/")[-2]}
        frozen = {**frozen, **{n: v for n, v in trainable["rest"].items() if n not in norms}}
        trainable = {"adapters": trainable["adapters"], "rest": norms}
    tx = _adafactor(lr, steps, scale, b1=None)
    compressed = method.kind in ("flora", "flora_gaussian")
    estimator = "gaussian" if method.kind == "flora_gaussian" else "subspace"
    acc = compressed_accumulator(tau=method.rank if compressed else None, seed=seed, estimator=estimator)
    opt_state, acc_state = tx.init(trainable), acc.init(trainable)
    loss = bench.loss_fn(merge)

    def step(trainable, frozen, opt_state, acc_state, src, tgt):  # src, tgt: (k, 1, L)
        def micro(acc_state, batch):
            value, grads = jax.value_and_grad(loss)(trainable, frozen, batch[0], batch[1])
            return acc.add(grads, acc_state, weight=1.0 / k), value

        acc_state, values = jax.lax.scan(micro, acc_state, (src, tgt))
        grads, acc_state = acc.finish(acc_state, like=trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, acc_state, jnp.mean(values)

    order = _train_order(len(bench.train), k, steps, seed)
    shape = (k, 1, bench.cfg.max_len)
    src0, tgt0 = bench.train.src[order[0]].reshape(shape), bench.train.tgt[order[0]].reshape(shape)
    key = ("accumulation", method.key, lr, steps)
    if key not in bench.compiled:
        bench.compiled[key] = (
            jax.jit(step, donate_argnums=(0, 2, 3)).lower(trainable, frozen, opt_state, acc_state, src0, tgt0).compile()
        )
    compiled = bench.compiled[key]
    record = {
        "experiment": "accumulation",
        "method": method.key,
        "kind": method.kind,
        "rank": method.rank,
        "label": method.label,
        "seed": seed,
        "lr": lr,
        "steps": steps,
        "accum": k,
        "micro_batch": 1,
        "trainable_params": _param_count(trainable),
        "state_bytes": state_bytes(opt_state),
        "accum_bytes": state_bytes(acc_state.buffer) + state_bytes(acc_state.basis),
        "xla": _memory(compiled),
        "curve": [],
        "train_tokens": int(sum(np.count_nonzero(bench.train.tgt[rows][:, 1:]) for rows in order)),
    }
    every = max(1, steps // 6)  # six points on the validation curve
    train_losses = []
    for i, rows in enumerate(order):
        trainable, opt_state, acc_state, value = compiled(
            trainable,
            frozen,
            opt_state,
            acc_state,
            bench.train.src[rows].reshape(shape),
            bench.train.tgt[rows].reshape(shape),
        )
        train_losses.append(value)
        advance(1)
        if (i + 1) % every == 0 or i + 1 == steps:
            record["curve"].append(
                [
                    i + 1,
                    bench.val_loss(merge(trainable, frozen)),
                    float(np.mean([float(v) for v in train_losses[-every:]])),
                ]
            )
    return _finish(bench, record, merge(trainable, frozen), t0)


def with_steps(scale: Scale, steps: int | None, finetune_steps: int | None) -> Scale:
    """``scale`` with the step budgets overridden where given."""
    changes = {}
    if steps is not None:
        changes["steps"] = steps
    if finetune_steps is not None:
        changes["finetune_steps"] = finetune_steps
    return replace(scale, **changes)

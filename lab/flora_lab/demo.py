"""``flora-lab demo``: train one small LLaMA-style LM on real text with several optimizers.

The same randomly initialised model (:class:`flora_lab.lm.TinyLlama`) is trained from the same
seed, on the same batches, for the same number of steps, with each optimizer in turn; the run
reports, per optimizer, the exact optimizer-state bytes (from the state tensors), the peak of live
tensor bytes over one full training step (:class:`flora_lab.livebytes.LiveTensorBytes`), training
tokens/s and the final validation loss. At this size activations dominate the peak, so the demo
ends with the same optimizers at scale (:func:`memory_at_scale`: a LLaMA-7B shape by default,
built on the meta device): exact state bytes and the predicted training-step memory from the
library's estimator (:mod:`flora_opt.memory`), and what fits on a 24 GiB GPU. It writes
``results.json``, ``results.md`` and ``demo.png``.

:func:`train_lm` and :func:`prepare_data` are shared with the benchmark suite
(``benchmarks/run.py quality``), so the demo is a small version of the quality benchmark.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "ADAM_BASED",
    "ADAM_RECIPE",
    "DEFAULT_LRS",
    "DEMO_MODEL",
    "OPTIMIZERS",
    "SCALE",
    "DemoSettings",
    "available_optimizers",
    "format_results",
    "make_optimizer",
    "memory_at_scale",
    "plot_results",
    "prepare_data",
    "recipe_options",
    "run_demo",
    "train_lm",
]

#: The model the demo and the quality benchmark train: ~1.1M parameters with a 1024-token BPE
#: vocabulary, every block matrix at least 128 wide so that ranks 8-64 compress their momenta (the
#: 1024 x 128 embedding and head are embedding-like and keep full momentum by default).
DEMO_MODEL = dict(vocab_size=1024, dim=128, n_layers=4, n_heads=2, max_seq_len=256)

#: Optimizers the demo knows (names of :mod:`flora_lab.contenders`), in display order.
OPTIMIZERS = ("adamw", "adafactor_momentum", "flora", "flora_8bit", "galore", "apollo")

#: Peak learning rates (after linear warm-up over 10% of the steps; cosine decay to 10%), tuned for
#: DEMO_MODEL at the demo's default budget on a 2x-spaced grid around the best value:
#: ``python benchmarks/run.py quality --preset demo`` (docs/benchmarks.md, "The demo"). Adafactor and
#: Flora use relative step sizes (``lr * RMS(W)``), hence the larger values.
DEFAULT_LRS = {
    "adamw": 1.5e-3,
    "adafactor_momentum": 0.1,
    "flora": 0.1,
    "flora_8bit": 0.1,
    "galore": 6e-2,
    "apollo": 1e-2,
}

#: LLaMA's AdamW settings (Touvron et al., 2023, section 2.2): ``betas=(0.9, 0.95)``,
#: ``eps=1e-8``, decoupled weight decay 0.1. Every Adam-based contender (:data:`ADAM_BASED`) of
#: the demo and of the quality benchmark trains with them; Adafactor and Flora keep their own
#: defaults (no weight decay: their ``lr`` is relative to ``RMS(W)``, so ``lr * weight_decay``
#: would mean a different decay).
ADAM_RECIPE = {"betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
ADAM_BASED = ("adamw", "galore", "apollo", "lora")


def available_optimizers() -> dict[str, str | None]:
    """``{name: None if usable else the reason}``."""
    from . import contenders

    out: dict[str, str | None] = {}
    for name in OPTIMIZERS:
        ok, reason = contenders.available(name)
        out[name] = None if ok else reason
    return out


def label(name: str, rank: int) -> str:
    from . import contenders

    return contenders.label(name, rank)


# ---- optimizers ------------------------------------------------------------------------------


def make_optimizer(name: str, model, lr: float, rank: int = 32, interval: int = 50):
    """The demo's optimizer ``name``: the contender of that name (:mod:`flora_lab.contenders`)
    with the options of :func:`recipe_options` (rank, resample interval, :data:`ADAM_RECIPE`).

    ``interval`` is Flora's resample interval ``kappa`` and GaLore/APOLLO's
    ``update_proj_gap``: the libraries' defaults (1000, 200) are meant for runs of many
    thousand steps, where a short run would keep one subspace throughout.
    """
    from . import contenders

    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")
    return contenders.make(name, model, lr, **recipe_options(name, rank, interval))


def recipe_options(name: str, rank: int | None = None, interval: int | None = None) -> dict[str, Any]:
    """Options of contender ``name`` in the demo and the quality benchmark: its rank and resample
    interval (:func:`flora_lab.contenders.sweep_options`) and, for the Adam-based ones
    (:data:`ADAM_BASED`), :data:`ADAM_RECIPE`; the libraries' defaults otherwise."""
    from . import contenders

    options = contenders.sweep_options(name, rank, interval)
    if name in ADAM_BASED:
        options.update(ADAM_RECIPE)
    return options


def formula_state_bytes(name: str, model, rank: int) -> int | None:
    """The state bytes the formulas (:mod:`flora_lab.peer_memory`) predict for the demo optimizer ``name``."""
    from . import contenders

    return contenders.predicted_state_bytes(name, model, **contenders.sweep_options(name, rank))


# ---- data ------------------------------------------------------------------------------------


def prepare_data(dataset: str = "shakespeare_sample", vocab_size: int = 1024, kind: str = "bpe"):
    """``(train_ids, val_ids, info)``: the dataset's splits tokenized with a BPE trained on train."""
    from . import data

    start = time.perf_counter()
    train_text = data.load_text(dataset, "train")
    val_text = data.load_text(dataset, "validation")
    tokenizer = data.train_tokenizer(train_text, vocab_size=vocab_size, kind=kind)
    train_ids = data.encode(train_text, tokenizer, dtype=np.int64)
    val_ids = data.encode(val_text, tokenizer, dtype=np.int64)
    info = dict(
        dataset=dataset,
        tokenizer=kind,
        vocab_size=tokenizer.vocab_size,
        train_chars=len(train_text),
        val_chars=len(val_text),
        train_tokens=int(train_ids.size),
        val_tokens=int(val_ids.size),
        prepare_s=time.perf_counter() - start,
    )
    return train_ids, val_ids, info


# ---- training --------------------------------------------------------------------------------


def lr_lambda(steps: int, warmup: int, final_fraction: float = 0.1) -> Callable[[int], float]:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``final_fraction`` of the peak."""

    def factor(step: int) -> float:  # step = number of optimizer steps taken so far
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def evaluate(model, val_ids: np.ndarray, batch_size: int, seq_len: int, max_batches: int | None) -> float:
    """Token-weighted mean cross-entropy over fixed, non-overlapping validation windows."""
    import torch

    from .data import lm_batches

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in lm_batches(val_ids, batch_size, seq_len, shuffle=False, num_batches=max_batches):
            x, y = torch.from_numpy(x), torch.from_numpy(y)
            device = next(model.parameters()).device
            loss = model(x.to(device), y.to(device))
            total += float(loss) * y.numel()
            count += y.numel()
    model.train(was_training)
    return total / count


def train_lm(
    model,
    optimizer,
    train_ids: np.ndarray,
    val_ids: np.ndarray,
    *,
    steps: int,
    batch_size: int,
    seq_len: int,
    data_seed: int = 0,
    warmup: int | None = None,
    eval_every: int | None = None,
    eval_batches: int | None = 16,
    final_eval_batches: int | None = None,
    clip_norm: float | None = 1.0,
    measure_memory_step: int | None = 2,
    progress: bool | str = False,
    device=None,
) -> dict[str, Any]:
    """Train ``model`` with ``optimizer`` for ``steps`` steps; return curves, memory and speed.

    Batches come from :func:`flora_lab.data.lm_batches` with ``data_seed``, so every optimizer
    sees the same tokens. The learning rate of every param group follows :func:`lr_lambda` (its
    ``lr`` at call time is the peak). Gradients are clipped to global norm ``clip_norm``.
    ``measure_memory_step`` (1-based) runs under :class:`~flora_lab.livebytes.LiveTensorBytes` and is
    left out of the timing; the others are timed with forward, backward and step separately.
    """
    import torch

    from .data import lm_batches
    from .livebytes import LiveTensorBytes
    from .peer_memory import optimizer_state_bytes, optimizer_state_tensors

    if steps < 1:
        raise ValueError(f"Invalid steps: {steps}: must be >= 1")
    warmup = max(1, steps // 10) if warmup is None else warmup
    schedule = lr_lambda(steps, warmup)
    peaks = [group["lr"] for group in optimizer.param_groups]
    trainable = [p for p in model.parameters() if p.requires_grad]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=steps,
            desc=progress if isinstance(progress, str) else "train",
            unit="step",
            dynamic_ncols=True,
            leave=True,
            mininterval=0.5,
        )
    batches = lm_batches(train_ids, batch_size, seq_len, seed=data_seed, num_batches=steps)
    model.train()
    curve: list[dict[str, float]] = []
    train_losses: list[float] = []
    times = {"forward_backward": 0.0, "optimizer": 0.0}
    timed_steps = 0
    peak_live = None
    nonfinite = False
    start = time.perf_counter()
    for step_index, (x, y) in enumerate(batches):
        step = step_index + 1
        factor = schedule(step_index)
        for group, peak in zip(optimizer.param_groups, peaks):
            group["lr"] = peak * factor
        x = torch.from_numpy(x)
        y = torch.from_numpy(y)
        if device is not None:
            x, y = x.to(device), y.to(device)
        measure = step == measure_memory_step
        with LiveTensorBytes() if measure else contextlib.nullcontext() as tracker:
            if tracker is not None:
                tracker.track(list(model.parameters()) + list(model.buffers()))
                tracker.track(p.grad for p in trainable if p.grad is not None)
                tracker.track(optimizer_state_tensors(optimizer))
            t0 = time.perf_counter()
            loss = model(x, y)
            loss.backward()
            if clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(trainable, clip_norm)
            if x.is_cuda:
                torch.cuda.synchronize(x.device)
            t1 = time.perf_counter()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if x.is_cuda:
                torch.cuda.synchronize(x.device)
            t2 = time.perf_counter()
        if tracker is not None:
            peak_live = tracker.peak
        elif step > 1:  # step 1 allocates the state; it is not timed either
            times["forward_backward"] += t1 - t0
            times["optimizer"] += t2 - t1
            timed_steps += 1
        value = float(loss.detach())
        train_losses.append(value)
        if not math.isfinite(value):
            nonfinite = True
        if eval_every and (step % eval_every == 0) and step != steps:
            curve.append(
                dict(
                    step=step,
                    tokens=step * batch_size * seq_len,
                    val_loss=evaluate(model, val_ids, batch_size, seq_len, eval_batches),
                )
            )
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{value:.3f}")
        if nonfinite:
            break
    wall = time.perf_counter() - start
    final = evaluate(model, val_ids, batch_size, seq_len, final_eval_batches) if not nonfinite else float("nan")
    curve.append(dict(step=len(train_losses), tokens=len(train_losses) * batch_size * seq_len, val_loss=final))
    if bar is not None:
        bar.set_postfix(loss=f"{train_losses[-1]:.3f}", val=f"{final:.3f}")
        bar.close()
    train_time = times["forward_backward"] + times["optimizer"]
    return dict(
        steps=len(train_losses),
        tokens=len(train_losses) * batch_size * seq_len,
        final_val_loss=final,
        diverged=nonfinite,
        train_losses=train_losses,
        val_curve=curve,
        state_bytes=optimizer_state_bytes(optimizer),
        peak_live_bytes=peak_live,
        tokens_per_s=(timed_steps * batch_size * seq_len / train_time) if train_time > 0 else None,
        timed_steps=timed_steps,
        forward_backward_s=times["forward_backward"],
        optimizer_s=times["optimizer"],
        optimizer_fraction=(times["optimizer"] / train_time) if train_time > 0 else None,
        wall_s=wall,
    )


# ---- memory at scale -------------------------------------------------------------------------

# the predicted totals of one row: (results key, what it assumes)
_MODES = (
    ("total_bytes", "all gradients"),
    ("total_layerwise_bytes", "layer-wise updates"),
    ("total_accumulation_bytes", "gradient accumulation"),
)


def memory_at_scale(optimizers, model: str = "llama-7b", rank: int = 256) -> dict[str, Any]:
    """The demo's optimizers on a large model: exact state bytes and predicted training-step memory.

    ``model`` is a preset of :mod:`flora_opt.memory` (``llama-7b``: the shape of LLaMA 7B and
    LLaMA-2-7B) or a ``config.json``, built on the meta device (nothing allocated or downloaded).
    Weights and gradients are in :data:`SCALE`'s dtype; every rank-``rank`` method uses ``rank``. The library's
    estimator (:func:`flora_opt.memory.estimate`) gives the totals: with all gradients alive, with
    layer-wise updates, with gradient accumulation (Flora: compressed at ``rank``, layer-wise; the
    others: naive); the state bytes come from :func:`flora_lab.peer_memory.method_state_bytes`
    (the library's formulas for AdamW, Adafactor and Flora). Activations are not included.
    Returns ``{"estimate": Estimate.to_dict(), "gpu_gib", "fits": {name: [modes that fit]}}``.
    """
    from flora_opt import memory

    from . import contenders, peer_memory

    name, config, source = memory.load_config(model)
    params = memory.params_from_config(config, memory.DTYPE_BYTES[SCALE["dtype"]])
    estimate = memory.estimate(name, params=params, rank=rank, dtype=SCALE["dtype"], methods=())
    estimate.source = source
    for optimizer in optimizers:
        if optimizer in peer_memory.METHODS:
            estimate.add_row(
                optimizer,
                contenders.label(optimizer, rank),
                peer_memory.method_state_bytes(optimizer, params, rank),
                compressed_accumulation=optimizer in memory.FLORA_METHODS,
            )
    budget = SCALE["gpu_gib"] * 2**30
    fits = {row["method"]: [mode for key, mode in _MODES if row[key] <= budget] for row in estimate.rows}
    return dict(estimate=estimate.to_dict(), gpu_gib=SCALE["gpu_gib"], fits=fits)


def _format_fits(at_scale: dict[str, Any]) -> str:
    """One line: which optimizers fit on the GPU of :data:`SCALE`, and how."""
    parts = []
    for row in at_scale["estimate"]["rows"]:
        fitting = [
            f"{mode} ({row[key] / 2**30:.1f} GiB)" for key, mode in _MODES if mode in at_scale["fits"][row["method"]]
        ]
        if fitting:
            parts.append(f"{row['optimizer']} fits with {' or '.join(fitting)}")
        else:
            best = min(row[key] for key, _ in _MODES)
            parts.append(f"{row['optimizer']} does not ({best / 2**30:.1f} GiB at best)")
    return (
        f"On a {at_scale['gpu_gib']} GiB GPU (weights, gradients and optimizer state; activations need the rest): "
        + "; ".join(parts)
        + "."
    )


# ---- the demo --------------------------------------------------------------------------------


@dataclass
class DemoSettings:
    steps: int = 200
    batch_size: int = 16
    seq_len: int = 128
    rank: int = 32
    kappa: int = 50
    eval_every: int = 40
    eval_batches: int = 8
    final_eval_batches: int | None = None
    dataset: str = "shakespeare_sample"
    vocab_size: int = 1024
    seed: int = 0
    optimizers: list[str] = field(default_factory=list)
    lrs: dict[str, float] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=lambda: dict(DEMO_MODEL))
    threads: int | None = None
    device: str = "cpu"
    scale_model: str | None = "llama-7b"
    scale_rank: int = 256


#: The memory story at scale (:func:`memory_at_scale`): weights and gradients in bfloat16, the
#: estimate set against a GPU of this many GiB. ``DemoSettings.scale_model`` (a preset of
#: ``flora_opt.memory`` or a config.json; ``None`` skips it) and ``scale_rank`` choose the rest.
SCALE = dict(dtype="bf16", gpu_gib=24)

#: ``--quick``: about a minute on a 2-core CPU.
QUICK = dict(steps=40, eval_every=10, eval_batches=4, final_eval_batches=None)


def _environment() -> dict[str, Any]:
    import torch

    from flora_opt import __version__

    return dict(
        flora_opt=__version__,
        torch=torch.__version__,
        python=platform.python_version(),
        threads=torch.get_num_threads(),
        cpu_count=os.cpu_count(),
        machine=platform.machine(),
    )


def run_demo(
    settings: DemoSettings,
    out_dir: str | os.PathLike,
    *,
    progress: bool = True,
    plot: bool = True,
    command: str | None = None,
    log=print,
) -> dict[str, Any]:
    """Run the demo, write ``results.json`` (and ``demo.png``) to ``out_dir``, return the results."""
    import torch

    from .lm import LMConfig, TinyLlama, tensor_bytes

    if settings.threads:
        torch.set_num_threads(settings.threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    train_ids, val_ids, data_info = prepare_data(settings.dataset, settings.vocab_size)
    log(
        f"data: {data_info['dataset']}, BPE vocab {data_info['vocab_size']}: "
        f"{data_info['train_tokens']:,} train / {data_info['val_tokens']:,} validation tokens"
    )
    model_cfg = LMConfig(**{**settings.model, "vocab_size": data_info["vocab_size"]})
    torch.manual_seed(settings.seed)
    reference = TinyLlama(model_cfg)
    initial = {k: v.clone() for k, v in reference.state_dict().items()}
    n_params = reference.num_params()
    log(
        f"model: LLaMA-style, dim {model_cfg.dim}, {model_cfg.n_layers} layers, {model_cfg.n_heads} heads, "
        f"ffn {model_cfg.ffn_dim}: {n_params:,} parameters ({tensor_bytes(reference.parameters()) / 2**20:.2f} MiB); "
        f"{settings.steps} steps x {settings.batch_size} x {settings.seq_len} tokens"
    )
    rows = []
    for name in settings.optimizers:
        model = TinyLlama(model_cfg)
        model.load_state_dict(initial)
        model.to(settings.device)
        lr = settings.lrs.get(name, DEFAULT_LRS[name])
        optimizer = make_optimizer(name, model, lr, settings.rank, settings.kappa)
        result = train_lm(
            model,
            optimizer,
            train_ids,
            val_ids,
            steps=settings.steps,
            batch_size=settings.batch_size,
            seq_len=settings.seq_len,
            data_seed=settings.seed,
            eval_every=settings.eval_every,
            eval_batches=settings.eval_batches,
            final_eval_batches=settings.final_eval_batches,
            progress=f"{label(name, settings.rank):<22}" if progress else False,
            device=settings.device,
        )
        result.update(
            optimizer=name,
            label=label(name, settings.rank),
            lr=lr,
            optimizer_class=f"{type(optimizer).__module__}.{type(optimizer).__name__}",
            state_bytes_formula=formula_state_bytes(name, model, settings.rank),
        )
        rows.append(result)
        del model, optimizer
    adamw = next((r["state_bytes"] for r in rows if r["optimizer"] == "adamw"), None)
    for row in rows:
        row["state_vs_adamw"] = row["state_bytes"] / adamw if adamw else None
    results = dict(
        command=command,
        settings=dict(settings.__dict__),
        model=dict(model_cfg.to_dict(), n_params=n_params, param_bytes=tensor_bytes(reference.parameters())),
        data=data_info,
        environment=_environment(),
        rows=rows,
    )
    if settings.scale_model is not None:
        results["at_scale"] = memory_at_scale(settings.optimizers, settings.scale_model, settings.scale_rank)
    results["wall_s"] = time.perf_counter() - started
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(format_results(results) + "\n")
    if plot:
        try:
            plot_results(results, out / "demo.png")
            results["plot"] = str(out / "demo.png")
        except ImportError:
            log("matplotlib is not installed: demo.png not written (pip install matplotlib)")
    return results


def format_results(results: dict[str, Any]) -> str:
    """Markdown tables of a demo run: the training comparison, then the memory at scale."""
    header = "| optimizer | state MiB | state / AdamW | peak live MiB | tokens/s | final val loss |"
    lines = [header, "|---|---:|---:|---:|---:|---:|"]
    for r in results["rows"]:
        ratio = "" if r.get("state_vs_adamw") is None else f"{r['state_vs_adamw']:.3f}"
        peak = "" if r["peak_live_bytes"] is None else f"{r['peak_live_bytes'] / 2**20:.2f}"
        tps = "" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:,.0f}"
        lines.append(
            f"| {r['label']} | {r['state_bytes'] / 2**20:.3f} | {ratio} | {peak} | {tps} | {r['final_val_loss']:.4f} |"
        )
    lines += [
        "",
        "peak live = weights + gradients + optimizer state + activations of one step; at this size the "
        "activations dominate it.",
    ]
    if "at_scale" in results:
        lines += ["", *_format_at_scale(results["at_scale"])]
    return "\n".join(lines)


def _format_at_scale(at_scale: dict[str, Any]) -> list[str]:
    est = at_scale["estimate"]
    gib = 2**30
    lines = [
        f"At scale: {est['model']}, {est['n_params']:,} parameters ({est['source']}), {est['dtype']} weights "
        f"({est['weights_bytes'] / gib:.2f} GiB) and gradients, rank {est['rank']}; training-step memory "
        "predicted by flora_opt.memory (weights + gradients + optimizer state; activations not included; "
        "any model: flora-opt memory MODEL):",
        "",
        "| optimizer | state GiB | state / AdamW | all gradients GiB | layer-wise GiB | accumulation GiB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in est["rows"]:
        lines.append(
            f"| {r['optimizer']} | {r['state_bytes'] / gib:.2f} | {r['state_vs_adamw']:.3f} | "
            f"{r['total_bytes'] / gib:.2f} | {r['total_layerwise_bytes'] / gib:.2f} | "
            f"{r['total_accumulation_bytes'] / gib:.2f} |"
        )
    return [*lines, "", _format_fits(at_scale)]


def plot_results(results: dict[str, Any], path: Path) -> None:
    """Validation-loss curves, optimizer-state bars and peak-live-memory bars in one PNG; below
    them, with ``results["at_scale"]``, the predicted training-step memory at scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    at_scale = results.get("at_scale")
    fig = plt.figure(figsize=(15, 9.5 if at_scale else 4.5))
    grid = fig.add_gridspec(
        2 if at_scale else 1, 3, width_ratios=[5, 3, 3], height_ratios=[1, 1.1] if at_scale else [1]
    )
    ax_loss, ax_state, ax_peak = (fig.add_subplot(grid[0, i]) for i in range(3))
    for r in rows:
        tokens = [p["tokens"] for p in r["val_curve"]]
        ax_loss.plot(tokens, [p["val_loss"] for p in r["val_curve"]], marker="o", ms=3, label=r["label"])
    ax_loss.set_xlabel("training tokens")
    ax_loss.set_ylabel("validation loss (nats/token)")
    ax_loss.set_title(f"{results['data']['dataset']}: validation loss")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    names = [r["label"] for r in rows]
    y = np.arange(len(rows))
    colors = [f"C{i}" for i in range(len(rows))]
    for ax, key, title in (
        (ax_state, "state_bytes", "optimizer state (exact)"),
        (ax_peak, "peak_live_bytes", "peak live tensors, one step"),
    ):
        values = [(r[key] or 0) / 2**20 for r in rows]
        ax.barh(y, values, color=colors)
        for yi, v in zip(y, values):
            ax.text(v, yi, f" {v:.2f}", va="center", fontsize=8)
        ax.set_yticks(y, names if ax is ax_state else [""] * len(rows))
        ax.invert_yaxis()
        ax.set_xlabel("MiB")
        ax.set_title(title)
        ax.set_xlim(0, max([*values, 1e-09]) * 1.3)
        ax.grid(axis="x", alpha=0.3)
    if at_scale:
        _plot_at_scale(fig.add_subplot(grid[1, :]), at_scale, {r["optimizer"]: c for r, c in zip(rows, colors)})
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_at_scale(ax, at_scale: dict[str, Any], colors: dict[str, str]) -> None:
    """Stacked bars (weights, gradients, state) per optimizer and mode, and the GPU's size."""
    est = at_scale["estimate"]
    gib = 2**30
    ticks, labels = [], []
    position = 0.0
    for row in est["rows"]:
        for key, mode in _MODES:
            state = row["state_bytes"] / gib
            weights = est["weights_bytes"] / gib
            grads = row[key] / gib - weights - state  # all, layer-wise or accumulated gradients
            ax.barh(position, weights, color="0.75", label="weights" if position == 0 else None)
            ax.barh(position, grads, left=weights, color="0.55", label="gradients" if position == 0 else None)
            ax.barh(position, state, left=weights + grads, color=colors.get(row["method"], "C0"))
            ax.text(weights + grads + state, position, f" {row[key] / gib:.1f}", va="center", fontsize=8)
            ticks.append(position)
            labels.append(f"{row['optimizer']}: {mode}")
            position += 1
        position += 0.6
    budget = at_scale["gpu_gib"]
    ax.axvline(budget, color="k", linestyle="--", linewidth=1)
    ax.text(budget, position - 0.9, f" {budget} GiB GPU", fontsize=8, va="center")
    ax.set_yticks(ticks, labels, fontsize=8)
    ax.set_ylim(position - 0.3, -0.7)
    ax.set_xlabel("GiB (activations not included; optimizer state in the optimizer's colour)")
    ax.set_title(
        f"{est['model']} ({est['n_params'] / 1e9:.1f}B parameters, {est['dtype']}, rank {est['rank']}): "
        "predicted training-step memory"
    )
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)

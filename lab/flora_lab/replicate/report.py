"""Tables (``report.md``) and plots (PNG) of a ``flora-lab replicate`` results dictionary.

Per experiment and method: mean and sample standard deviation (``ddof=1``; 0 with one seed)
of the final validation loss and BLEU over seeds, the bytes (identical across seeds), and the
gap to the full-size baseline ``100 (L - L_base) / L_base`` in percent of its validation loss
(``adafactor_momentum`` for the momentum experiment, ``naive`` for accumulation).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["BASELINE", "summarise", "write_plots", "write_report"]

#: The full-size baseline of each experiment (the row Flora should match).
BASELINE = {"momentum": "adafactor_momentum", "accumulation": "naive"}
_BYTES = {
    "momentum": ("momentum_bytes", "momentum bytes"),
    "accumulation": ("accum_bytes", "accumulation buffer bytes"),
}


def _save(fig, ax, path, xlabel: str, ylabel: str, title: str) -> str:
    """Label, save (110 dpi) and close one figure; returns its file name."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _stats(values) -> dict:
    arr = np.asarray(values, dtype=float)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if arr.size > 1 else 0.0, "n": int(arr.size)}


def summarise(results: dict) -> dict:
    """``{experiment: {method: row}}``, the rows in run order; keeps the best lr factor per method
    (lowest mean validation loss) when a grid was run, and lists the others under ``grid``."""
    groups: dict = {}
    for run in results["runs"]:
        key = (run["experiment"], run["method"], run["lr_factor"])
        groups.setdefault(key, []).append(run)
    summary: dict = {}
    for (experiment, method, factor), runs in groups.items():
        first = runs[0]
        row = {
            "label": first["label"],
            "kind": first["kind"],
            "rank": first["rank"],
            "lr": first["lr"],
            "lr_factor": factor,
            "val_loss": _stats([r["val_loss"] for r in runs]),
            "bleu": _stats([r["bleu"] for r in runs]),
            "state_bytes": first["state_bytes"],
            "trainable_params": first["trainable_params"],
            "xla_peak": first["xla"].get("peak"),
            "xla_temp": first["xla"].get("temp"),
            "seeds": [r["seed"] for r in runs],
        }
        field = _BYTES[experiment][0]
        row[field] = first[field]
        rows = summary.setdefault(experiment, {})
        if method in rows:
            rows[method].setdefault("grid", [])
            old = rows[method]
            entry = {"lr": row["lr"], "val_loss": row["val_loss"]["mean"]}
            if row["val_loss"]["mean"] < old["val_loss"]["mean"]:
                grid = [*old.pop("grid"), {"lr": old["lr"], "val_loss": old["val_loss"]["mean"]}]
                rows[method] = {**row, "grid": grid}
            else:
                old["grid"].append(entry)
        else:
            rows[method] = row
    for experiment, rows in summary.items():
        base = rows.get(BASELINE[experiment])
        for row in rows.values():
            if base is not None:
                row["gap_pct"] = 100.0 * (row["val_loss"]["mean"] - base["val_loss"]["mean"]) / base["val_loss"]["mean"]
    return summary


def _pm(stat: dict, digits: int) -> str:
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}" if stat["n"] > 1 else f"{stat['mean']:.{digits}f}"


def _claims(experiment: str, rows: dict) -> list[str]:
    """The replication targets, checked on the summary: Flora at its best rank within 1% of the
    full-size baseline's validation loss, and Flora below LoRA's loss at every common rank."""
    lines = []
    base = rows.get(BASELINE[experiment])
    floras = {r["rank"]: r for r in rows.values() if r["kind"] == "flora"}
    loras = {r["rank"]: r for r in rows.values() if r["kind"] == "lora"}
    if base is not None and floras:
        best = min(floras.values(), key=lambda r: r["val_loss"]["mean"])
        held = best["gap_pct"] <= 1.0
        lines.append(
            f"- Flora at its best rank (r={best['rank']}) is {best['gap_pct']:+.2f}% from {base['label']} "
            f"in validation loss: {'within' if held else 'NOT within'} 1%."
        )
    for rank in sorted(set(floras) & set(loras)):
        f, lo = floras[rank]["val_loss"], loras[rank]["val_loss"]
        verdict = "better than" if f["mean"] < lo["mean"] else "NOT better than"
        lines.append(f"- Flora r={rank} ({_pm(f, 4)}) is {verdict} LoRA r={rank} ({_pm(lo, 4)}) in validation loss.")
    if experiment == "momentum" and "adafactor" in rows and floras:
        worst = max(floras.values(), key=lambda r: r["val_loss"]["mean"])
        nm = rows["adafactor"]["val_loss"]
        verdict = "better than" if worst["val_loss"]["mean"] < nm["mean"] else "NOT better than"
        lines.append(
            f"- Flora at every rank (worst: r={worst['rank']}, {_pm(worst['val_loss'], 4)}) is {verdict} "
            f"Adafactor without momentum ({_pm(nm, 4)})."
        )
    return lines


def write_report(results: dict, path: Path) -> None:
    """``report.md``: one table per experiment, the claims checked, the command."""
    lines = [
        "# flora-lab replicate: results",
        "",
        f"Command: `{results['command']}` ({results['scale']} scale, {results['seeds']} seed(s) per method, "
        f"{results.get('wall_s', 0) / 60:.1f} min). Mean ± sample standard deviation over seeds; "
        "gap = difference to the full-size baseline in % of its validation loss.",
        "",
    ]
    model = results["model"]
    lines += [
        f"Model: encoder-decoder Transformer, d_model {model['d_model']}, {model['n_heads']} heads, "
        f"d_ff {model['d_ff']}, {model['enc_layers']}+{model['dec_layers']} layers, vocabulary {model['vocab']}, "
        f"max length {model['max_len']}.",
        "",
    ]
    for experiment, rows in results.get("summary", {}).items():
        field, title = _BYTES[experiment]
        info = results["data"][experiment]
        lines += [
            f"## {experiment}",
            "",
            f"Task: {info['task']}; {info['train_pairs']} training pairs, {info['validation_pairs']} held-out pairs.",
        ]
        if experiment == "accumulation":
            pre = results.get("pretrain", {})
            lines += [
                f"Pretraining: {info['pretrain_task']}, {pre.get('steps')} steps; validation loss of the "
                f"pretrained model on the fine-tuning task: {pre.get('val_loss_before_finetune', float('nan')):.4f}. "
                f"BLEU of copying the KJV source: {info['copy_source_bleu']:.2f}."
            ]
        lines += [
            "",
            f"| method | lr | val loss | gap | BLEU | {title} | optimizer-state bytes | trainable params "
            "| XLA step peak bytes |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for row in rows.values():
            gap = f"{row['gap_pct']:+.2f}%" if "gap_pct" in row else ""
            lines.append(
                f"| {row['label']} | {row['lr']:.2g} | {_pm(row['val_loss'], 4)} | {gap} | "
                f"{_pm(row['bleu'], 2)} | {row[field]:,} | {row['state_bytes']:,} | "
                f"{row['trainable_params']:,} | {row['xla_peak'] or 0:,} |"
            )
        grids = [(row["label"], row["grid"]) for row in rows.values() if "grid" in row]
        if grids:
            lines += ["", "Learning-rate grid (mean validation loss of the other learning rates tried):", ""]
            for label, grid in grids:
                tried = ", ".join(f"{g['lr']:.2g}: {g['val_loss']:.4f}" for g in sorted(grid, key=lambda g: g["lr"]))
                lines.append(f"- {label}: {tried}")
        lines += ["", "Claims:", "", *_claims(experiment, rows), ""]
        for plot in results.get("plots", {}).get(experiment, []):
            lines.append(f"![{experiment}]({plot})")
        lines.append("")
    path.write_text("\n".join(lines))


def write_plots(results: dict, out: Path) -> dict:
    """Per experiment: ``<experiment>_curves.png`` (validation loss against optimizer steps, mean
    over seeds) and ``<experiment>_memory.png`` (final validation loss against momentum or
    accumulation bytes, with the seeds' standard deviation). Returns the file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = {}
    for experiment, rows in results.get("summary", {}).items():
        runs = [r for r in results["runs"] if r["experiment"] == experiment]
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for method, row in rows.items():
            curves = [r["curve"] for r in runs if r["method"] == method and r["lr_factor"] == row["lr_factor"]]
            steps = [p[0] for p in curves[0]]
            mean = np.mean([[p[1] for p in c] for c in curves], axis=0)
            ax.plot(steps, mean, marker="o", ms=3, label=row["label"])
        curves_name = _save(
            fig,
            ax,
            out / f"{experiment}_curves.png",
            "optimizer step",
            "validation loss",
            f"{experiment}: validation loss (mean of {results['seeds']} seed(s))",
        )

        field, title = _BYTES[experiment]
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for row in rows.values():
            ax.errorbar(
                row[field], row["val_loss"]["mean"], yerr=row["val_loss"]["std"], fmt="o", capsize=3, label=row["label"]
            )
        ax.set_xscale("symlog", linthresh=1024)
        memory_name = _save(
            fig,
            ax,
            out / f"{experiment}_memory.png",
            title,
            "final validation loss",
            f"{experiment}: quality against memory",
        )
        written[experiment] = [curves_name, memory_name]
    return written

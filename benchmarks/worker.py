"""One benchmark contender in one fresh process (started by ``benchmarks/run.py``; not a CLI for people).

    python benchmarks/worker.py --task {step,throughput,quality} --spec JSON --config JSON --out FILE

``--spec`` names the contender: ``{"id", "kind", "label", "options", "lr"}`` with ``kind`` a name
of the one contender registry, ``flora_lab.contenders`` (``adamw``, ``adamw8bit_torchao``,
``adamw8bit_bnb``, ``adafactor``, ``adafactor_momentum``, ``flora``, ``flora_8bit``, ``galore``,
``apollo``, ``lora``: peft LoRA adapters on the lab's model, ``options`` ``rank`` and ``alpha``, the
rest AdamW's), and ``options`` are the contender's keyword options (JSON). The
state-bytes prediction of a contender is ``flora_lab.contenders.predicted_state_bytes`` (the
``flora_lab.peer_memory`` formula of the same name). The training loop is the lab's
(``flora_lab.demo.train_lm``). The result is written as JSON to ``--out``; failures are recorded
there as ``{"ok": false, "error": ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for _path in (REPO, REPO / "lab"):  # flora_opt and the lab (flora_lab) of this checkout
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import logging  # noqa: E402

for _name in ("torchao", "torch.utils._pytree", "transformers"):
    logging.getLogger(_name).setLevel(logging.ERROR)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402


def build_optimizer(spec, model, lr):
    """The contender's optimizer over ``model``'s trainable parameters."""
    from flora_lab import contenders

    kind, options = spec["kind"], dict(spec.get("options", {}))
    if kind == "lora":  # the adapters were added to the model (task_quality); AdamW over what is trainable
        options.pop("rank", None)
        options.pop("alpha", None)
    ok, reason = contenders.available(kind)
    if not ok:
        raise RuntimeError(f"{kind} unavailable: {reason}")
    return contenders.make(kind, model, lr=lr, **options)


def predicted_state_bytes(spec, model) -> int | None:
    """The state bytes the formulas predict: for Flora, ``flora_opt.statebytes`` of each
    parameter's layout under this run's options; for a peer, its ``flora_lab.peer_memory`` formula
    (``None`` for LoRA, which has none)."""
    import dataclasses

    from flora_lab import contenders
    from flora_opt import core, statebytes

    kind, options = spec["kind"], spec.get("options", {})
    if kind == "lora":
        return None
    if kind in ("flora", "flora_8bit"):
        merged = {**contenders.DEFAULTS[kind], **options}
        hp = core.FloraHyperParams(
            **{f.name: merged[f.name] for f in dataclasses.fields(core.FloraHyperParams) if f.name in merged}
        )
        full = dataclasses.replace(hp, rank=None)  # the full_momentum_for parameters' group
        keep = merged.get("full_momentum_for") or ()
        return sum(
            statebytes.state_bytes(
                core.tensor_layout(tuple(p.shape), full if any(k in name for k in keep) else hp), kind == "flora_8bit"
            )
            for name, p in model.named_parameters()
            if p.requires_grad
        )
    return contenders.predicted_state_bytes(kind, model, **options)


# ---- tasks -----------------------------------------------------------------------------------


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def task_step(spec, config) -> dict:
    """State bytes and ``optimizer.step()`` time on a transformers model (same protocol as
    ``benchmarks/peers/ref_worker.py``: random token batches, real forward/backward)."""
    from benchmarks.peers.ref_worker import build_model
    from flora_lab.peer_memory import optimizer_state_bytes

    device = torch.device(config.get("device", "cpu"))
    model, model_spec = build_model(config["model"], seed=config.get("seed", 0))
    model.to(device).train()
    optimizer = build_optimizer(spec, model, spec.get("lr", 1e-3))
    gen = torch.Generator().manual_seed(config.get("seed", 0) + 1)
    vocab = int(model.config.vocab_size)
    step_times, fwd_times = [], []
    for _ in range(config["steps"]):
        ids = torch.randint(0, vocab, (config["batch_size"], config["seq_len"]), generator=gen).to(device)
        _sync(device)
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        _sync(device)
        t1 = time.perf_counter()
        optimizer.step()
        _sync(device)
        t2 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        fwd_times.append(t1 - t0)
        step_times.append(t2 - t1)
    later = step_times[1:] or step_times
    n_params = sum(p.numel() for p in model.parameters())
    return dict(
        model=config["model"],
        model_spec=model_spec,
        n_params=n_params,
        param_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
        state_bytes=optimizer_state_bytes(optimizer),
        state_bytes_formula=predicted_state_bytes(spec, model),
        first_step_s=step_times[0],
        step_s_median=statistics.median(later),
        step_s=step_times,
        forward_backward_s_median=statistics.median(fwd_times[1:] or fwd_times),
        optimizer_class=f"{type(optimizer).__module__}.{type(optimizer).__name__}",
        device=str(device),
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        max_memory_allocated=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
    )


def _tiny_llama(config, seed):
    from flora_lab.lm import LMConfig, TinyLlama

    torch.manual_seed(seed)
    return TinyLlama(LMConfig(**config["model"]))


def task_throughput(spec, config) -> dict:
    """Training tokens/s at several tokens-per-step sizes (random tokens; timing only)."""
    device = torch.device(config.get("device", "cpu"))
    model = _tiny_llama(config, config.get("seed", 0)).to(device)
    optimizer = build_optimizer(spec, model, spec.get("lr", 1e-3))
    vocab = model.cfg.vocab_size
    seq = config["seq_len"]
    gen = torch.Generator().manual_seed(1)
    sizes = []
    for tokens in config["tokens_per_step"]:
        batch = max(1, tokens // seq)
        fwd, opt = [], []
        for i in range(config["warmup"] + config["steps"]):
            ids = torch.randint(0, vocab, (batch, seq + 1), generator=gen).to(device)
            _sync(device)
            t0 = time.perf_counter()
            loss = model(ids[:, :-1], ids[:, 1:])
            loss.backward()
            _sync(device)
            t1 = time.perf_counter()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            _sync(device)
            t2 = time.perf_counter()
            if i >= config["warmup"]:
                fwd.append(t1 - t0)
                opt.append(t2 - t1)
        f, o = statistics.median(fwd), statistics.median(opt)
        sizes.append(
            dict(
                tokens_per_step=batch * seq,
                batch_size=batch,
                forward_backward_s=f,
                optimizer_s=o,
                iteration_s=f + o,
                tokens_per_s=batch * seq / (f + o),
                optimizer_fraction=o / (f + o),
                forward_backward_all=fwd,
                optimizer_all=opt,
            )
        )
    from flora_lab.peer_memory import optimizer_state_bytes

    return dict(n_params=model.num_params(), state_bytes=optimizer_state_bytes(optimizer), sizes=sizes)


def task_quality(spec, config) -> dict:
    """Train from scratch on the prepared token ids and report the validation loss."""
    from flora_lab.demo import train_lm
    from flora_lab.lm import LORA_TARGETS

    seed = config["seed"]
    train_ids = np.load(config["train_ids"])
    val_ids = np.load(config["val_ids"])
    model = _tiny_llama(config, seed)
    if spec["kind"] == "lora":
        from peft import LoraConfig, get_peft_model

        options = spec.get("options", {})
        rank = options.get("rank", 32)
        model = get_peft_model(
            model,
            LoraConfig(r=rank, lora_alpha=options.get("alpha", rank), lora_dropout=0.0, target_modules=LORA_TARGETS),
        )
        # LoRA on every block matrix; embeddings, output head and norms are trained in full
        for name, p in model.named_parameters():
            if "lora_" not in name:
                p.requires_grad_(name.endswith(("embed.weight", "lm_head.weight")) or "norm" in name)
    optimizer = build_optimizer(spec, model, spec["lr"])
    result = train_lm(
        model,
        optimizer,
        train_ids,
        val_ids,
        steps=config["steps"],
        batch_size=config["batch_size"],
        seq_len=config["seq_len"],
        data_seed=seed,
        eval_every=config["eval_every"],
        eval_batches=config["eval_batches"],
        final_eval_batches=config["final_eval_batches"],
        clip_norm=config.get("clip_norm", 1.0),
    )
    every = max(1, len(result["train_losses"]) // 100)
    result["train_losses"] = result["train_losses"][::every]
    result["train_losses_every"] = every
    result["n_params"] = sum(p.numel() for p in model.parameters())
    result["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result["state_bytes_formula"] = predicted_state_bytes(spec, model)
    result["optimizer_class"] = f"{type(optimizer).__module__}.{type(optimizer).__name__}"
    return result


TASKS = {"step": task_step, "throughput": task_throughput, "quality": task_quality}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=list(TASKS), required=True)
    parser.add_argument("--spec", required=True, help="contender JSON")
    parser.add_argument("--config", required=True, help="task configuration JSON")
    parser.add_argument("--out", required=True, help="result JSON path")
    args = parser.parse_args(argv)
    spec, config = json.loads(args.spec), json.loads(args.config)
    if config.get("threads"):
        torch.set_num_threads(int(config["threads"]))
    out = dict(
        ok=False,
        task=args.task,
        spec=spec,
        config=config,
        argv=[sys.executable, *sys.argv],
        python=sys.executable,
        torch=torch.__version__,
        threads=torch.get_num_threads(),
    )
    started = time.perf_counter()
    try:
        out.update(TASKS[args.task](spec, config))
        out["ok"] = True
    except Exception as error:
        traceback.print_exc()
        out["error"] = f"{type(error).__name__}: {error}"
    out["wall_s"] = time.perf_counter() - started
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1, default=str))
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Train a flax causal language model with optax Flora (or Adafactor / AdamW) on real text.

The model is a GPT-style decoder written in ``flax.linen`` and built from a config (a preset,
``--model tiny|small|gpt2-small``, or a JSON file, ``--config``); the text is a corpus of
:mod:`flora_lab.data` (``shakespeare_sample`` ships with the lab: no download), tokenized
with UTF-8 bytes or a byte-level BPE trained on the training split. Gradient accumulation runs
inside the jitted train step as a ``jax.lax.scan`` over micro-batches; with
``--compressed-accumulation`` the scan carries Flora's compressed accumulator
(``flora_opt.optax.compressed_accumulator``: ``tau x max(m, n)`` per matrix instead of ``m x n``)
instead of full-size gradient sums.

Examples (CPU, a minute or two)::

    PYTHONPATH=. python examples/flax/causal_lm.py --optimizer flora --tau 16 --max-steps 30
    PYTHONPATH=. python examples/flax/causal_lm.py --optimizer flora --tau 16 \
        --accumulation-steps 4 --compressed-accumulation --accumulation-tau 16
    PYTHONPATH=. python examples/flax/causal_lm.py --optimizer adafactor --max-steps 30

The last lines report the validation loss, the optimizer-state bytes and the peak memory: the
device's ``peak_bytes_in_use`` where the backend reports it (GPU), otherwise XLA's memory
analysis of the compiled train step (arguments + outputs + temporaries, minus donated buffers).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

try:
    import flax.linen as nn
except ImportError as error:  # pragma: no cover
    raise SystemExit(f"this example needs flax ({error}): pip install -r examples/flax/requirements.txt") from error

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from flora_lab import data
from flora_opt.optax import compressed_accumulator, flora, state_bytes


@dataclasses.dataclass(frozen=True)
class Config:
    vocab_size: int = 256
    d_model: int = 128
    n_layer: int = 2
    n_head: int = 4
    d_ff: int = 512
    max_len: int = 1024
    param_dtype: str = "float32"


PRESETS = {
    "tiny": dict(d_model=128, n_layer=2, n_head=4, d_ff=512),
    "small": dict(d_model=256, n_layer=4, n_head=4, d_ff=1024),
    "gpt2-small": dict(d_model=768, n_layer=12, n_head=12, d_ff=3072),
}


class Block(nn.Module):
    config: Config

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dtype = jnp.dtype(cfg.param_dtype)
        batch, length, _ = x.shape
        head_dim = cfg.d_model // cfg.n_head
        h = nn.LayerNorm(param_dtype=dtype, name="ln_1")(x)
        qkv = nn.Dense(3 * cfg.d_model, param_dtype=dtype, name="qkv")(h)  # kernel (d, 3d)
        q, k, v = jnp.split(qkv.reshape(batch, length, 3 * cfg.n_head, head_dim), 3, axis=2)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
        causal = jnp.tril(jnp.ones((length, length), bool))
        scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
        attention = jnp.einsum(
            "bhqk,bkhd->bqhd", jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype), v
        )
        x = x + nn.Dense(cfg.d_model, param_dtype=dtype, name="proj")(attention.reshape(batch, length, cfg.d_model))
        h = nn.LayerNorm(param_dtype=dtype, name="ln_2")(x)
        h = nn.Dense(cfg.d_ff, param_dtype=dtype, name="fc")(h)
        return x + nn.Dense(cfg.d_model, param_dtype=dtype, name="fc_out")(nn.gelu(h))


class CausalLM(nn.Module):
    config: Config

    @nn.compact
    def __call__(self, ids):
        cfg = self.config
        dtype = jnp.dtype(cfg.param_dtype)
        embed = nn.Embed(cfg.vocab_size, cfg.d_model, param_dtype=dtype, name="wte")
        positions = self.param("wpe", nn.initializers.normal(0.02), (cfg.max_len, cfg.d_model), dtype)
        x = embed(ids) + positions[None, : ids.shape[1]]
        for i in range(cfg.n_layer):
            x = Block(cfg, name=f"h{i}")(x)
        x = nn.LayerNorm(param_dtype=dtype, name="ln_f")(x)
        return embed.attend(x.astype(dtype)).astype(jnp.float32)  # tied output embedding


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Causal LM training with flax and optax Flora.")
    parser.add_argument("--model", default="tiny", choices=sorted(PRESETS), help="config preset (random init)")
    parser.add_argument("--config", default=None, help="JSON file of Config fields (overrides --model)")
    parser.add_argument("--param-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--dataset", default="shakespeare_sample", choices=data.DATASETS)
    parser.add_argument("--tokenizer", default="bytes", choices=["bytes", "bpe"])
    parser.add_argument("--vocab-size", type=int, default=1024, help="BPE vocabulary size")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8, help="micro-batch size")
    parser.add_argument("--accumulation-steps", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument(
        "--compressed-accumulation",
        action="store_true",
        help="accumulate micro-batch gradients compressed (docs/algorithm.md section 12)",
    )
    parser.add_argument("--accumulation-tau", type=int, default=None, help="default: --tau")
    parser.add_argument("--max-steps", type=int, default=30, help="optimizer steps")
    parser.add_argument("--optimizer", default="flora", choices=["adamw", "adafactor", "flora"])
    parser.add_argument("--lr", type=float, default=None, help="default: 1e-3 (adamw), 1e-2 (adafactor, flora)")
    parser.add_argument("--warmup-steps", type=int, default=0)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--b1", type=float, default=0.9, help="momentum (adafactor and flora)")
    parser.add_argument("--tau", type=int, default=64, help="Flora momentum rank")
    parser.add_argument("--kappa", type=int, default=1000, help="Flora resample interval")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="0 disables clipping")
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--print-json", action="store_true", help="end with a 'RESULT {json}' summary line")
    args = parser.parse_args(argv)
    if args.accumulation_steps < 1:
        parser.error(f"--accumulation-steps must be >= 1, got {args.accumulation_steps}")
    if args.compressed_accumulation and args.accumulation_steps == 1:
        print("note: --compressed-accumulation has no effect with --accumulation-steps 1", file=sys.stderr)
    return args


def build_config(args, vocab_size: int) -> Config:
    fields = dict(PRESETS[args.model])
    if args.config:
        fields = json.loads(Path(args.config).read_text())
    fields.update(
        vocab_size=vocab_size, max_len=max(fields.get("max_len", 1024), args.seq_len), param_dtype=args.param_dtype
    )
    return Config(**fields)


def make_optimizer(args) -> optax.GradientTransformation:
    lr = args.lr or (1e-3 if args.optimizer == "adamw" else 1e-2)
    schedule = optax.linear_schedule(0.0, lr, args.warmup_steps) if args.warmup_steps else lr
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731  no decay on norms/biases
    if args.optimizer == "adamw":
        tx = optax.adamw(schedule, weight_decay=args.weight_decay, mask=decay_mask)
    elif args.optimizer == "adafactor":
        tx = optax.adafactor(
            schedule,
            momentum=args.b1 or None,
            weight_decay_rate=args.weight_decay or None,
            weight_decay_mask=decay_mask,
        )
    else:
        tx = flora(
            schedule,
            b1=args.b1,
            tau=args.tau,
            kappa=args.kappa,
            seed=args.seed,
            weight_decay=args.weight_decay,
            weight_decay_mask=decay_mask,
        )
    if args.max_grad_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(args.max_grad_norm), tx)
    return tx


def peak_memory(compiled) -> tuple[int | None, str]:
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"], f"{jax.devices()[0].platform} peak_bytes_in_use"
    analysis = compiled.memory_analysis()
    if analysis is None:
        return None, "unavailable"
    total = (
        analysis.argument_size_in_bytes
        + analysis.output_size_in_bytes
        + analysis.temp_size_in_bytes
        - analysis.alias_size_in_bytes
    )
    return total, "XLA memory analysis of the train step"


def main(argv=None):
    args = parse_args(argv)
    train_text, val_text = data.load_text(args.dataset, "train"), data.load_text(args.dataset, "validation")
    tokenizer = data.train_tokenizer(train_text, args.vocab_size, kind=args.tokenizer)
    train_ids, val_ids = (
        data.encode(train_text, tokenizer, dtype=np.int32),
        data.encode(val_text, tokenizer, dtype=np.int32),
    )
    config = build_config(args, tokenizer.vocab_size)
    model = CausalLM(config)
    params = model.init(jax.random.PRNGKey(args.seed), jnp.zeros((1, args.seq_len), jnp.int32))["params"]
    n_params = sum(p.size for p in jax.tree_util.tree_leaves(params))
    tx = make_optimizer(args)
    opt_state = tx.init(params)
    k_micro = args.accumulation_steps
    compress = args.compressed_accumulation and k_micro > 1
    accumulator = compressed_accumulator(tau=args.accumulation_tau or args.tau, seed=args.seed) if compress else None
    acc_state = accumulator.init(params) if compress else None

    def loss_fn(params, inputs, targets):
        logits = model.apply({"params": params}, inputs)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    grad_fn = jax.value_and_grad(loss_fn)

    def train_step(params, opt_state, acc_state, inputs, targets):
        """One optimizer step over ``k_micro`` micro-batches (``inputs``: (k, batch, seq))."""
        if k_micro == 1:
            loss, grads = grad_fn(params, inputs[0], targets[0])
        elif compress:

            def micro(carry, batch):
                acc_state, loss_sum = carry
                loss, grads = grad_fn(params, *batch)
                return (accumulator.add(grads, acc_state, weight=1.0 / k_micro), loss_sum + loss), None

            (acc_state, loss_sum), _ = jax.lax.scan(micro, (acc_state, 0.0), (inputs, targets))
            grads = accumulator.result(acc_state, like=params)  # unbiased estimate of the mean gradient
            acc_state = accumulator.reset(acc_state)  # next cycle: a fresh projection
            loss = loss_sum / k_micro
        else:

            def micro(carry, batch):
                grad_sum, loss_sum = carry
                loss, grads = grad_fn(params, *batch)
                grad_sum = jax.tree.map(lambda s, g: s + g.astype(jnp.float32) / k_micro, grad_sum, grads)
                return (grad_sum, loss_sum + loss), None

            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
            (grads, loss_sum), _ = jax.lax.scan(micro, (zeros, 0.0), (inputs, targets))
            grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
            loss = loss_sum / k_micro
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, acc_state, loss

    step_fn = jax.jit(train_step, donate_argnums=(0, 1, 2))
    eval_fn = jax.jit(loss_fn)
    batches = data.lm_batches(train_ids, args.batch_size * k_micro, args.seq_len, seed=args.seed)

    def next_batch():
        inputs, targets = next(batches)
        shape = (k_micro, args.batch_size, args.seq_len)
        return jnp.asarray(inputs.reshape(shape)), jnp.asarray(targets.reshape(shape))

    inputs, targets = next_batch()
    start = time.perf_counter()
    compiled = step_fn.lower(params, opt_state, acc_state, inputs, targets).compile()
    compile_s = time.perf_counter() - start
    print(
        f"model: {n_params / 1e6:.2f}M params ({args.model}{', ' + args.config if args.config else ''}, "
        f"{args.param_dtype}); optimizer: {args.optimizer}; accumulation: {k_micro} micro-batches"
        f"{' (compressed)' if compress else ''}; compiled in {compile_s:.1f} s",
        flush=True,
    )
    progress = tqdm(range(args.max_steps), desc="train")
    tokens, seconds, losses = 0, 0.0, []
    for step in progress:
        if step:
            inputs, targets = next_batch()
        started = time.perf_counter()
        params, opt_state, acc_state, loss = compiled(params, opt_state, acc_state, inputs, targets)
        loss = float(loss)
        losses.append(loss)
        if step:  # the first step includes one-off work
            seconds += time.perf_counter() - started
            tokens += k_micro * args.batch_size * args.seq_len
        progress.set_postfix(loss=f"{loss:.3f}")
        if not math.isfinite(loss):
            raise SystemExit(f"non-finite training loss at step {step + 1}")

    total, count = 0.0, 0
    for inputs, targets in data.lm_batches(
        val_ids, args.batch_size, args.seq_len, shuffle=False, num_batches=args.eval_batches
    ):
        total += float(eval_fn(params, jnp.asarray(inputs), jnp.asarray(targets))) * inputs.size
        count += inputs.size
    val_loss = total / count
    peak, source = peak_memory(compiled)
    opt_bytes = state_bytes(opt_state) + (state_bytes(acc_state) if acc_state is not None else 0)
    print(f"validation loss: {val_loss:.4f} (perplexity {math.exp(val_loss):.2f}) over {count} tokens")
    print(
        f"optimizer state: {opt_bytes / 2**20:.2f} MiB ({opt_bytes / n_params:.3f} bytes/param)"
        + (f"; throughput: {tokens / seconds:.0f} tokens/s" if seconds else "")
    )
    print(f"peak memory: {'n/a' if peak is None else f'{peak / 2**20:.1f} MiB'} ({source})")
    result = dict(val_loss=val_loss, train_losses=losses, optimizer_state_bytes=opt_bytes, peak_bytes=peak)
    if args.print_json:
        print("RESULT " + json.dumps(result))
    return result


if __name__ == "__main__":
    main()

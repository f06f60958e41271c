"""A small T5-style encoder-decoder Transformer in flax, with LoRA as a parameter transformation.

The model (:class:`Seq2Seq`) is a pre-norm Transformer: token embedding ``E`` (``vocab x d``,
shared by the encoder input, the decoder input and the output head, as in T5) plus sinusoidal
positions; ``L_enc`` encoder layers ``x += Attn(RMSNorm(x)); x += FF(RMSNorm(x))``; ``L_dec``
decoder layers with causal self-attention, cross-attention and the feed-forward block; a final
RMSNorm and ``logits = h E^T / sqrt(d)``. Every block matrix is a bias-free ``Dense`` (``d x d``
for ``q, k, v, o``; ``d x f`` and ``f x d`` for the feed-forward, GELU between).

LoRA (Hu et al. 2022) is not a module here but a map on the parameter tree
(:func:`lora_split`/:func:`lora_merge`): every block kernel ``W0`` (``m x n``) is frozen and the
trained pair ``A`` (``m x r``, Gaussian with std ``1/sqrt(m)``) and ``B`` (``r x n``, zeros) make
the kernel ``W = W0 + (alpha / r) A B`` with ``alpha = r`` (scale 1). The merged tree has the
base model's structure, so evaluation and decoding compile once for every method.

Greedy decoding (:func:`greedy_decode`) keeps a key/value cache per decoder layer and the
cross-attention keys/values of the encoder output, so a step costs one token per sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

__all__ = ["ModelConfig", "Seq2Seq", "greedy_decode", "lora_merge", "lora_split", "sequence_loss"]


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of :class:`Seq2Seq`. ``vocab`` includes the special ids (pad, bos, eos, mask)."""

    vocab: int
    d_model: int = 128
    n_heads: int = 4
    d_ff: int = 512
    enc_layers: int = 2
    dec_layers: int = 2
    max_len: int = 64


def _sinusoid(length: int, d: int) -> np.ndarray:
    pos = np.arange(length)[:, None]
    inv = 1.0 / (10000 ** (np.arange(0, d, 2) / d))
    table = np.zeros((length, d), np.float32)
    table[:, 0::2] = np.sin(pos * inv)
    table[:, 1::2] = np.cos(pos * inv)
    return table


def _dense(features: int, name: str) -> nn.Dense:
    return nn.Dense(features, use_bias=False, name=name, kernel_init=nn.initializers.lecun_normal())


def _heads(x, n):
    b, t, d = x.shape
    return x.reshape(b, t, n, d // n)


def _attend(q, k, v, mask):
    """Multi-head attention of ``q`` (b, t, h, e) on ``k, v`` (b, s, h, e); ``mask`` (b|1, 1, t, s)."""
    scores = jnp.einsum("bthe,bshe->bhts", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
    scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
    out = jnp.einsum("bhts,bshe->bthe", jax.nn.softmax(scores, axis=-1), v)
    return out.reshape(out.shape[0], out.shape[1], -1)


class Attention(nn.Module):
    d: int
    n_heads: int

    def setup(self):
        self.q, self.k, self.v, self.o = (_dense(self.d, n) for n in ("q", "k", "v", "o"))

    def kv(self, src):
        return _heads(self.k(src), self.n_heads), _heads(self.v(src), self.n_heads)

    def __call__(self, x, src, mask):
        k, v = self.kv(src)
        return self.o(_attend(_heads(self.q(x), self.n_heads), k, v, mask))

    def with_kv(self, x, k, v, mask):
        return self.o(_attend(_heads(self.q(x), self.n_heads), k, v, mask))


class FeedForward(nn.Module):
    d: int
    d_ff: int

    @nn.compact
    def __call__(self, x):
        return _dense(self.d, "wo")(nn.gelu(_dense(self.d_ff, "wi")(x)))


class EncoderLayer(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, mask):
        h = nn.RMSNorm(name="norm_attn")(x)
        x = x + Attention(self.cfg.d_model, self.cfg.n_heads, name="attn")(h, h, mask)
        return x + FeedForward(self.cfg.d_model, self.cfg.d_ff, name="ff")(nn.RMSNorm(name="norm_ff")(x))


class DecoderLayer(nn.Module):
    cfg: ModelConfig

    def setup(self):
        c = self.cfg
        self.norm_self, self.norm_cross, self.norm_ff = (
            nn.RMSNorm(name=n) for n in ("norm_self", "norm_cross", "norm_ff")
        )
        self.self_attn = Attention(c.d_model, c.n_heads)
        self.cross_attn = Attention(c.d_model, c.n_heads)
        self.ff = FeedForward(c.d_model, c.d_ff)

    def __call__(self, y, enc, self_mask, cross_mask):
        h = self.norm_self(y)
        y = y + self.self_attn(h, h, self_mask)
        y = y + self.cross_attn(self.norm_cross(y), enc, cross_mask)
        return y + self.ff(self.norm_ff(y))

    def cross_kv(self, enc):
        return self.cross_attn.kv(enc)

    def step(self, y, t, cache, cross_k, cross_v, cross_mask):
        """One decoding position ``t``: ``y`` (b, 1, d); ``cache = (k, v)`` of shape (b, L, h, e)."""
        h = self.norm_self(y)
        k_new, v_new = self.self_attn.kv(h)
        k = jax.lax.dynamic_update_slice(cache[0], k_new, (0, t, 0, 0))
        v = jax.lax.dynamic_update_slice(cache[1], v_new, (0, t, 0, 0))
        causal = (jnp.arange(k.shape[1]) <= t)[None, None, None, :]
        y = y + self.self_attn.with_kv(h, k, v, causal)
        y = y + self.cross_attn.with_kv(self.norm_cross(y), cross_k, cross_v, cross_mask)
        return y + self.ff(self.norm_ff(y)), (k, v)


class Seq2Seq(nn.Module):
    """Encoder-decoder Transformer; ``__call__(src, tgt_in)`` returns logits ``(b, t, vocab)``.

    ``src``/``tgt_in`` are int arrays padded with id 0 on the right (``pad`` must be 0).
    """

    cfg: ModelConfig

    def setup(self):
        c = self.cfg
        self.embed = nn.Embed(c.vocab, c.d_model, embedding_init=nn.initializers.normal(1.0))
        self.encoder = [EncoderLayer(c, name=f"enc_{i}") for i in range(c.enc_layers)]
        self.decoder = [DecoderLayer(c, name=f"dec_{i}") for i in range(c.dec_layers)]
        self.enc_norm = nn.RMSNorm()
        self.dec_norm = nn.RMSNorm()
        self.positions = jnp.asarray(_sinusoid(c.max_len, c.d_model))

    def _embed(self, ids, offset=0):
        x = self.embed(ids)
        pos = jax.lax.dynamic_slice_in_dim(self.positions, offset, ids.shape[1])
        return x + pos[None]

    def encode(self, src):
        mask = (src != 0)[:, None, None, :]
        x = self._embed(src)
        for layer in self.encoder:
            x = layer(x, mask)
        return self.enc_norm(x)

    def logits(self, h):
        return self.embed.attend(self.dec_norm(h)) / jnp.sqrt(self.cfg.d_model)

    def __call__(self, src, tgt_in):
        enc = self.encode(src)
        cross_mask = (src != 0)[:, None, None, :]
        t = tgt_in.shape[1]
        self_mask = jnp.tril(jnp.ones((t, t), bool))[None, None]
        y = self._embed(tgt_in)
        for layer in self.decoder:
            y = layer(y, enc, self_mask, cross_mask)
        return self.logits(y)

    def start_decoding(self, src):
        """Encoder output's cross-attention keys/values per decoder layer, and its mask."""
        enc = self.encode(src)
        return [layer.cross_kv(enc) for layer in self.decoder], (src != 0)[:, None, None, :]

    def decode_step(self, token, t, caches, cross, cross_mask):
        y = self._embed(token[:, None], t)
        new = []
        for layer, cache, (k, v) in zip(self.decoder, caches, cross):
            y, c = layer.step(y, t, cache, k, v, cross_mask)
            new.append(c)
        return self.logits(y)[:, 0], new


def sequence_loss(model: Seq2Seq, params, src, tgt):
    """Mean token cross-entropy of ``tgt[:, 1:]`` given ``src`` and ``tgt[:, :-1]`` (pad 0 ignored)."""
    logits = model.apply({"params": params}, src, tgt[:, :-1])
    labels = tgt[:, 1:]
    mask = (labels != 0).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def greedy_decode(model: Seq2Seq, params, src, bos: int, eos: int, length: int):
    """Greedy decodes ``(b, length)`` (after ``bos``; positions after ``eos`` are set to 0)."""
    cfg = model.cfg
    b = src.shape[0]
    cross, cross_mask = model.apply({"params": params}, src, method=Seq2Seq.start_decoding)
    e = cfg.d_model // cfg.n_heads
    caches = [(jnp.zeros((b, cfg.max_len, cfg.n_heads, e)),) * 2 for _ in range(cfg.dec_layers)]

    def body(t, carry):
        token, caches, out, done = carry
        logits, caches = model.apply(
            {"params": params}, token, t, caches, cross, cross_mask, method=Seq2Seq.decode_step
        )
        nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        nxt = jnp.where(done, 0, nxt)
        out = out.at[:, t].set(nxt)
        return nxt, caches, out, done | (nxt == eos)

    init = (jnp.full((b,), bos, jnp.int32), caches, jnp.zeros((b, length), jnp.int32), jnp.zeros((b,), bool))
    return jax.lax.fori_loop(0, length, body, init)[2]


def _is_block_kernel(path: tuple[str, ...], leaf) -> bool:
    return path[-1] == "kernel" and np.ndim(leaf) == 2


def lora_split(params, rank: int, key, *, train_rest: bool = True):
    """``(trainable, frozen)`` for LoRA at ``rank`` on every block kernel.

    ``trainable = {"adapters": {path: {"a", "b"}}, "rest": {...}}``: ``a`` (``m x r``) is
    Gaussian with std ``1/sqrt(m)``, ``b`` (``r x n``) zero, so the merged model starts equal to
    ``params``; ``rest`` holds the other leaves (embedding, norms) when ``train_rest``, else they
    are frozen too. ``frozen`` holds the block kernels (and the rest when not trained).
    """
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"Invalid rank: {rank!r}: must be an int >= 1")
    flat = traverse_util.flatten_dict(params)
    adapters, rest, frozen = {}, {}, {}
    kernels = [p for p, leaf in flat.items() if _is_block_kernel(p, leaf)]
    keys = jax.random.split(key, max(len(kernels), 1))
    for k, path in zip(keys, kernels):
        m, n = flat[path].shape
        if rank > min(m, n):
            raise ValueError(f"Invalid rank: {rank}: exceeds min(m, n) = {min(m, n)} of {'/'.join(path)}")
        adapters["/".join(path)] = {
            "a": jax.random.normal(k, (m, rank), jnp.float32) / np.sqrt(m),
            "b": jnp.zeros((rank, n), jnp.float32),
        }
        frozen["/".join(path)] = flat[path]
    for path, leaf in flat.items():
        if not _is_block_kernel(path, leaf):
            (rest if train_rest else frozen)["/".join(path)] = leaf
    return {"adapters": adapters, "rest": rest}, frozen


def lora_merge(trainable, frozen):
    """The base model's parameter tree with ``W = W0 + A B`` for every adapted kernel."""
    flat = {}
    for name, leaf in frozen.items():
        flat[tuple(name.split("/"))] = leaf
    for name, leaf in trainable["rest"].items():
        flat[tuple(name.split("/"))] = leaf
    for name, ab in trainable["adapters"].items():
        flat[tuple(name.split("/"))] = frozen[name] + ab["a"] @ ab["b"]
    return traverse_util.unflatten_dict(flat)

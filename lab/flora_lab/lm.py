"""A small LLaMA-style causal language model in plain PyTorch.

Used by ``flora-lab demo`` and the benchmarks (``benchmarks/run.py``), so both train the same
model. Nothing is downloaded: the model is randomly initialised from a :class:`LMConfig`.

The architecture follows LLaMA (Touvron et al., 2023): pre-norm blocks with RMSNorm, rotary
position embeddings, multi-head causal attention (``torch.nn.functional.scaled_dot_product_attention``)
and a SwiGLU MLP; untied input embedding and output head; no biases. Module names
(``blocks.<i>.attn.q``, ``blocks.<i>.mlp.up``, ``embed``, ``lm_head``) are what the peers' low-rank
conventions and ``peft`` LoRA target lists use.

Peak memory is measured with :class:`flora_lab.livebytes.LiveTensorBytes`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LORA_TARGETS", "LMConfig", "TinyLlama", "tensor_bytes"]

#: Linear layers of a block, for ``peft.LoraConfig(target_modules=LORA_TARGETS)``.
LORA_TARGETS = ["q", "k", "v", "o", "gate", "up", "down"]


@dataclass(frozen=True)
class LMConfig:
    """Shape of :class:`TinyLlama`. ``ffn_dim`` defaults to LLaMA's ``8/3 * dim`` rounded up to 16."""

    vocab_size: int = 1024
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    ffn_dim: int | None = None
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    init_std: float = 0.02

    def __post_init__(self):
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Invalid {name}: {value!r}: must be an int >= 1")
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            raise ValueError(f"Invalid n_heads: {self.n_heads}: dim={self.dim} must split into heads of even size")
        if self.ffn_dim is None:
            object.__setattr__(self, "ffn_dim", 16 * math.ceil(8 * self.dim / 3 / 16))

    def to_dict(self) -> dict:
        return asdict(self)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _rope(x, cos, sin):
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.q = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.k = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.v = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.o = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin):
        b, t, d = x.shape
        shape = (b, t, self.n_heads, d // self.n_heads)
        q = _rope(self.q(x).view(shape), cos, sin).transpose(1, 2)
        k = _rope(self.k(x).view(shape), cos, sin).transpose(1, 2)
        v = self.v(x).view(shape).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class TinyLlama(nn.Module):
    """LLaMA-style causal LM. ``model(ids)`` gives logits; ``model(ids, targets)`` the mean loss.

    Example:
      >>> model = TinyLlama(LMConfig(vocab_size=256, dim=64, n_layers=2, n_heads=2))
      >>> ids = torch.randint(0, 256, (2, 16))
      >>> loss = model(ids[:, :-1], ids[:, 1:])
    """

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        head_dim = cfg.dim // cfg.n_heads
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        angles = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float32), inv_freq)
        # (seq, 1, head_dim / 2): broadcast over batch and heads of (b, t, h, head_dim / 2)
        self.register_buffer("rope_cos", angles.cos()[:, None, :], persistent=False)
        self.register_buffer("rope_sin", angles.sin()[:, None, :], persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, self.cfg.init_std)
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, ids, targets=None):
        t = ids.shape[1]
        if t > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {t} exceeds max_seq_len={self.cfg.max_seq_len}")
        cos, sin = self.rope_cos[:t], self.rope_sin[:t]
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x, cos, sin)
        logits = self.lm_head(self.norm(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), targets.reshape(-1))


def tensor_bytes(tensors) -> int:
    """Sum of ``numel * element_size`` over distinct tensors."""
    seen, total = set(), 0
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total

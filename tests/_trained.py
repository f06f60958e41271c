"""A small trained Flora optimizer and a ``weights_only`` save/load round trip, shared by the
optimizer's and the checkpoint tests."""

import io

import torch

import flora_opt


def roundtrip(state_dict):
    """``state_dict`` saved with ``torch.save`` and loaded back with ``weights_only=True``."""
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def trained(rank=8, steps=3, **options):
    """A (20, 30) matrix and a (30,) vector after ``steps`` Flora steps on random gradients."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(20, 30)), torch.nn.Parameter(torch.randn(30))]
    opt = flora_opt.Flora(params, lr=1e-2, rank=rank, **options)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    return params, opt

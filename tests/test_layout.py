"""Section 1 of docs/algorithm.md: which tensor gets which state, on both sides of each threshold."""

import pytest

from flora_opt import core
from flora_opt.core import FloraHyperParams as HP

R = 32  # rank used in the table
F = 128  # min_dim_size_to_factor

# (shape, expected momentum, expected side, expected factored, expected state shapes)
CASES = [
    ((), "full", None, False, {"exp_avg": (), "exp_avg_sq": ()}),
    ((7,), "full", None, False, {"exp_avg": (7,), "exp_avg_sq": (7,)}),
    ((0, 40), "full", None, False, {"exp_avg": (0, 40), "exp_avg_sq": (0, 40)}),
    # 2-D just below, at and above the rank
    ((R - 1, 300), "full", None, False, {"exp_avg": (R - 1, 300), "exp_avg_sq": (R - 1, 300)}),
    ((R, 300), "full", None, False, {"exp_avg": (R, 300), "exp_avg_sq": (R, 300)}),
    ((R + 1, 300), "compressed", "rows", False, {"exp_avg": (R, 300), "exp_avg_sq": (R + 1, 300)}),
    # wide, tall, square; just below, at and above the factoring threshold
    ((F - 1, 400), "compressed", "rows", False, {"exp_avg": (R, 400), "exp_avg_sq": (F - 1, 400)}),
    ((F, 400), "compressed", "rows", True, {"exp_avg": (R, 400), "exp_avg_sq_row": (F,), "exp_avg_sq_col": (400,)}),
    ((F + 1, 400), "compressed", "rows", True, {"exp_avg": (R, 400), "exp_avg_sq_row": (F + 1,), "exp_avg_sq_col": (400,)}),
    ((400, F + 1), "compressed", "cols", True, {"exp_avg": (400, R), "exp_avg_sq_row": (400,), "exp_avg_sq_col": (F + 1,)}),
    ((200, 200), "compressed", "rows", True, {"exp_avg": (R, 200), "exp_avg_sq_row": (200,), "exp_avg_sq_col": (200,)}),
    # > 2-D: viewed as (shape[0], rest)
    ((64, 16, 3, 3), "compressed", "rows", False, {"exp_avg": (R, 144), "exp_avg_sq": (64, 144)}),
    ((256, 8, 4, 4), "compressed", "cols", True, {"exp_avg": (256, R), "exp_avg_sq_row": (256,), "exp_avg_sq_col": (128,)}),
    ((4, 3, 3), "full", None, False, {"exp_avg": (4, 9), "exp_avg_sq": (4, 9)}),
    # embedding-like: (vocab, dim) compresses dim
    ((5000, 192), "compressed", "cols", True, {"exp_avg": (5000, R), "exp_avg_sq_row": (5000,), "exp_avg_sq_col": (192,)}),
    ((50000, 16), "full", None, False, {"exp_avg": (50000, 16), "exp_avg_sq": (50000, 16)}),
]


@pytest.mark.parametrize("shape,momentum,side,factored,shapes", CASES, ids=[str(c[0]) for c in CASES])
def test_layout_table(shape, momentum, side, factored, shapes):
    layout = core.tensor_layout(shape, HP(lr=1.0, rank=R, min_dim_size_to_factor=F))
    assert layout.momentum == momentum
    assert layout.side == side
    assert layout.factored == factored
    assert layout.state_shapes() == shapes


@pytest.mark.parametrize("beta1", [None, 0.0])
def test_no_momentum_means_no_momentum_state(beta1):
    layout = core.tensor_layout((300, 400), HP(lr=1.0, rank=R, beta1=beta1))
    assert layout.momentum == "none"
    assert "exp_avg" not in layout.state_shapes()


def test_rank_none_keeps_full_momentum():
    layout = core.tensor_layout((300, 400), HP(lr=1.0, rank=None))
    assert layout.momentum == "full" and layout.state_shapes()["exp_avg"] == (300, 400)


def test_factorize_second_moment_false():
    layout = core.tensor_layout((300, 400), HP(lr=1.0, factorize_second_moment=False))
    assert not layout.factored and layout.state_shapes()["exp_avg_sq"] == (300, 400)

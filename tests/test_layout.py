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
    (
        (F + 1, 400),
        "compressed",
        "rows",
        True,
        {"exp_avg": (R, 400), "exp_avg_sq_row": (F + 1,), "exp_avg_sq_col": (400,)},
    ),
    (
        (400, F + 1),
        "compressed",
        "cols",
        True,
        {"exp_avg": (400, R), "exp_avg_sq_row": (400,), "exp_avg_sq_col": (F + 1,)},
    ),
    ((200, 200), "compressed", "rows", True, {"exp_avg": (R, 200), "exp_avg_sq_row": (200,), "exp_avg_sq_col": (200,)}),
    # > 2-D: viewed as (shape[0], rest)
    ((64, 16, 3, 3), "compressed", "rows", False, {"exp_avg": (R, 144), "exp_avg_sq": (64, 144)}),
    (
        (256, 8, 4, 4),
        "compressed",
        "cols",
        True,
        {"exp_avg": (256, R), "exp_avg_sq_row": (256,), "exp_avg_sq_col": (128,)},
    ),
    ((4, 3, 3), "full", None, False, {"exp_avg": (4, 9), "exp_avg_sq": (4, 9)}),
    # embedding-like: (vocab, dim) compresses dim
    (
        (5000, 192),
        "compressed",
        "cols",
        True,
        {"exp_avg": (5000, R), "exp_avg_sq_row": (5000,), "exp_avg_sq_col": (192,)},
    ),
    ((50000, 16), "full", None, False, {"exp_avg": (50000, 16), "exp_avg_sq": (50000, 16)}),
]


@pytest.mark.parametrize("shape,momentum,side,factored,shapes", CASES, ids=[str(c[0]) for c in CASES])
def test_layout_table(shape, momentum, side, factored, shapes):
    # rank and factoring thresholds alone (the aspect-ratio rule is tested below)
    layout = core.tensor_layout(shape, HP(lr=1.0, rank=R, min_dim_size_to_factor=F, max_aspect_ratio=None))
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


# (shape, compressed under the default max_aspect_ratio=4)
ASPECT = [
    ((100, 400), True),  # ratio exactly 4: compressed (GPT-2's MLP is 768 x 3072)
    ((100, 401), False),
    ((401, 100), False),
    ((400, 100), True),
    ((50257, 768), False),  # GPT-2 token embedding
    ((32000, 4096), False),  # LLaMA embedding / LM head
    ((4096, 11008), True),  # LLaMA MLP
    ((64, 16, 3, 3), True),  # conv kernel viewed as (64, 144)
]


@pytest.mark.parametrize("shape,compressed", ASPECT, ids=[str(c[0]) for c in ASPECT])
def test_embedding_like_matrices_keep_full_momentum_by_default(shape, compressed):
    layout = core.tensor_layout(shape, HP(lr=1.0, rank=R))
    assert layout.momentum == ("compressed" if compressed else "full")
    assert core.tensor_layout(shape, HP(lr=1.0, rank=R, max_aspect_ratio=None)).momentum == "compressed"
    assert core.tensor_layout(shape, HP(lr=1.0, rank=R, max_aspect_ratio=1000.0)).momentum == "compressed"


def test_transfer_growth_and_min_stable_kappa():
    # d=128, r=32, beta1=0.9: kappa=5 diverged in the quality ablation, kappa=10 did not
    assert core.transfer_growth(128, 32, 0.9, 5) > 1 > core.transfer_growth(128, 32, 0.9, 10)
    k = core.min_stable_kappa(128, 32, 0.9)
    assert core.transfer_growth(128, 32, 0.9, k) < 1 <= core.transfer_growth(128, 32, 0.9, k - 1)
    layout = core.tensor_layout((128, 300), HP(lr=1.0, rank=32, kappa=5))
    assert "kappa=5 is too small" in core.unstable_transfer_message(layout, HP(lr=1.0, rank=32, kappa=5))
    assert core.unstable_transfer_message(layout, HP(lr=1.0, rank=32, kappa=1000)) is None

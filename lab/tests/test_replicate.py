"""`flora-lab replicate` (lab/flora_lab/replicate): the quick run end to end, exact bytes, the
model's pieces (LoRA merge, cached greedy decoding, denoising) and validation."""

import json
import math

import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("sacrebleu")

import jax
import jax.numpy as jnp

from flora_lab.cli import main
from flora_lab.replicate import run_replicate, tasks
from flora_lab.replicate.model import ModelConfig, Seq2Seq, greedy_decode, lora_merge, lora_split


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("replicate")
    assert main(["replicate", "all", "--quick", "--out", str(out), "--no-progress"]) == 0
    return out, json.loads((out / "results.json").read_text())


def _param_shapes(model_cfg: dict):
    cfg = ModelConfig(**model_cfg)
    src = jnp.zeros((1, cfg.max_len), jnp.int32)
    params = jax.eval_shape(lambda: Seq2Seq(cfg).init(jax.random.PRNGKey(0), src, src[:, :-1])["params"])
    return [leaf.shape for leaf in jax.tree_util.tree_leaves(params)]


def test_quick_run_writes_sane_outputs(quick):
    out, results = quick
    for name in (
        "results.json",
        "report.md",
        "momentum_curves.png",
        "momentum_memory.png",
        "accumulation_curves.png",
        "accumulation_memory.png",
    ):
        assert (out / name).stat().st_size > 0, name
    report = (out / "report.md").read_text()
    assert "## momentum" in report and "## accumulation" in report and "Claims:" in report
    runs = results["runs"]
    assert [r["method"] for r in runs if r["experiment"] == "momentum"] == [
        "adafactor",
        "adafactor_momentum",
        "lora4",
        "lora16",
        "flora4",
        "flora16",
    ]
    assert [r["method"] for r in runs if r["experiment"] == "accumulation"] == [
        "naive",
        "lora4",
        "lora16",
        "flora4",
        "flora16",
        "flora_gaussian4",
        "flora_gaussian16",
    ]
    for r in runs:
        assert math.isfinite(r["val_loss"]) and 0 < r["val_loss"] < 20, r
        assert 0.0 <= r["bleu"] <= 100.0
        assert r["curve"] and all(math.isfinite(p[1]) for p in r["curve"])
        assert r["xla"]["temp"] > 0 and r["xla"]["peak"] >= r["xla"]["argument"]
    assert results["pretrain"]["val_loss_before_finetune"] > 0
    assert set(results["summary"]) == {"momentum", "accumulation"}


def test_quick_run_bytes_are_exact_and_ordered(quick):
    _, results = quick
    by = {(r["experiment"], r["method"]): r for r in results["runs"]}
    shapes = _param_shapes(results["model"])
    n_params = sum(int(np.prod(s)) for s in shapes)
    full = by["momentum", "adafactor_momentum"]
    assert full["trainable_params"] == n_params
    assert full["momentum_bytes"] == 4 * n_params  # float32 momentum of every leaf
    assert by["momentum", "adafactor"]["momentum_bytes"] == 0
    for rank in (4, 16):
        flora = by["momentum", f"flora{rank}"]
        assert flora["momentum_bytes"] < full["momentum_bytes"]
        assert flora["state_bytes"] < full["state_bytes"]
        assert by["momentum", f"lora{rank}"]["trainable_params"] < n_params
    naive = by["accumulation", "naive"]
    assert naive["accum_bytes"] == 4 * n_params
    for rank in (4, 16):
        # Gaussian: a buffer (r, n) or (m, r) for matrices with min(m, n) > r, full otherwise;
        # subspace: the same buffers and a basis (min(m, n), r) beside each
        compressed = [s for s in shapes if len(s) == 2 and min(s) > rank]
        gaussian = sum(4 * rank * max(s) for s in compressed) + sum(
            4 * int(np.prod(s)) for s in shapes if s not in compressed
        )
        assert by["accumulation", f"flora_gaussian{rank}"]["accum_bytes"] == gaussian
        bases = sum(4 * rank * min(s) for s in compressed)
        assert by["accumulation", f"flora{rank}"]["accum_bytes"] == gaussian + bases
        assert gaussian + bases < naive["accum_bytes"]


def test_lora_starts_at_the_base_model_and_adapts_block_kernels_only():
    cfg = ModelConfig(vocab=40, d_model=16, n_heads=2, d_ff=32, enc_layers=1, dec_layers=1, max_len=8)
    src = jnp.zeros((1, 8), jnp.int32)
    params = Seq2Seq(cfg).init(jax.random.PRNGKey(0), src, src[:, :-1])["params"]
    trainable, frozen = lora_split(params, 4, jax.random.PRNGKey(1))
    merged = lora_merge(trainable, frozen)
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(params)
    for a, b in zip(jax.tree_util.tree_leaves(merged), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(a, b)
    assert all(name.endswith("kernel") for name in trainable["adapters"])
    assert "embed/embedding" in trainable["rest"] and "embed/embedding" not in frozen
    moved = jax.tree.map(lambda x: x + 1.0, trainable)
    name = next(iter(trainable["adapters"]))
    w = lora_merge(moved, frozen)
    for part in name.split("/"):
        w = w[part]
    a, b = moved["adapters"][name]["a"], moved["adapters"][name]["b"]
    np.testing.assert_allclose(w, frozen[name] + a @ b, rtol=1e-6)
    with pytest.raises(ValueError, match="Invalid rank: 0"):
        lora_split(params, 0, jax.random.PRNGKey(1))
    with pytest.raises(ValueError, match="Invalid rank: 17"):
        lora_split(params, 17, jax.random.PRNGKey(1))


def test_cached_greedy_decoding_matches_the_full_forward_pass():
    """Each decoded token is the argmax of the teacher-forced model on the decoded prefix."""
    cfg = ModelConfig(vocab=30, d_model=16, n_heads=2, d_ff=32, enc_layers=2, dec_layers=2, max_len=10)
    model = Seq2Seq(cfg)
    src = jnp.asarray(np.random.default_rng(0).integers(1, 30, size=(3, 10)), jnp.int32).at[:, 7:].set(0)
    params = model.init(jax.random.PRNGKey(0), src, src[:, :-1])["params"]
    params = jax.tree.map(lambda x: x * 3.0, params)  # sharper logits: fewer ties
    bos, eos = 28, 29
    out = np.asarray(greedy_decode(model, params, src, bos, eos, 9))
    tgt_in = np.concatenate([np.full((3, 1), bos), out], axis=1)[:, :9]
    logits = model.apply({"params": params}, src, jnp.asarray(tgt_in))
    want = np.asarray(jnp.argmax(logits, -1))
    for row in range(3):
        ended = np.flatnonzero(out[row] == eos)
        stop = ended[0] + 1 if ended.size else 9
        np.testing.assert_array_equal(out[row, :stop], want[row, :stop])
        assert (out[row, stop:] == 0).all()


def test_denoising_masks_spans_and_keeps_targets():
    tok = tasks.build_tokenizer(["in the beginning god created the heaven and the earth"] * 20, 300)
    pairs = [("r", "and the earth was without form and void", "and the earth was without form and void")] * 50
    clean = tasks.make_task(pairs, tok, 40)
    mask = tasks.special_id(tok, "mask")
    noisy = tasks.noised(clean, mask, 0.3, seed=0)
    np.testing.assert_array_equal(noisy.tgt, clean.tgt)
    assert (noisy.src == mask).any() and not (clean.src == mask).any()
    assert (noisy.src != clean.src).any(axis=1).mean() > 0.5
    eos = tasks.special_id(tok, "eos")
    assert all(eos in row for row in noisy.src)
    assert tasks.decode(tok, clean.tgt[0][1:]) == pairs[0][2]


def test_sample_is_verse_aligned_and_split_like_the_data_module():
    rows = [line.split("\t") for line in tasks.SAMPLE_PATH.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 486 and all(len(r) == 4 and all(r) for r in rows)
    train = tasks.load_pairs("kjv", "sparv", "train", quick=True)
    val = tasks.load_pairs("kjv", "web", "validation", quick=True)
    assert len(train) + len(tasks.load_pairs("kjv", "sparv", "validation", quick=True)) == 486
    assert not {r for r, *_ in train} & {r for r, *_ in val} and len(val) == 40


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"seeds": 0}, "Invalid seeds: 0"),
        ({"jobs": 0}, "Invalid jobs: 0"),
        ({"lr_grid": (1.0, -2.0)}, "Invalid lr_grid"),
        ({"lrs": {"momentum": {"sgd": 1.0}}}, "Invalid lrs entry: momentum.sgd"),
        ({"lrs": {"momentum": {"flora": 0.0}}}, "Invalid lrs entry: momentum.flora=0.0"),
    ],
)
def test_invalid_options_name_argument_and_value(tmp_path, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        run_replicate(["momentum"], tmp_path, quick=True, **kwargs)
    with pytest.raises(ValueError, match="Invalid experiment: 'pretrain'"):
        run_replicate(["pretrain"], tmp_path, quick=True)

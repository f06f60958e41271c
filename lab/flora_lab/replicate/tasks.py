"""Verse-aligned Bible tasks for the replications: pairs, a shared BPE, padded id arrays.

* ``translate``: KJV English -> Reina-Valera 1909 Spanish (the momentum experiment).
* ``modernize``: KJV English -> World English Bible (the accumulation experiment's fine-tuning).
* ``denoise``: KJV and Reina-Valera verses with spans replaced by a mask id, target the verse
  (the accumulation experiment's pretraining, BART-style).

Full mode reads the Debian SWORD packages through :func:`flora_lab.data.load_parallel_verses`
(downloaded and cached once); quick mode reads the bundled ``data_files/bible_sample.tsv``
(486 verses of all three Bibles, see ``data_files/ATTRIBUTION.md``). The split is the data
module's: a verse is held out iff ``sha256(ref) % 10 == 0``, the same verse in every Bible, so
held-out verses are never trained on, in any task.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import data as lab_data

__all__ = [
    "SAMPLE_PATH",
    "SPECIAL",
    "TaskData",
    "build_tokenizer",
    "decode",
    "load_pairs",
    "make_task",
    "noised",
    "special_id",
]

SAMPLE_PATH = Path(__file__).resolve().parent.parent / "data_files" / "bible_sample.tsv"
_COLUMNS = ("kjv", "sparv", "web")
#: Special ids, placed after the BPE ids: ``pad`` is remapped to 0 (see :func:`make_task`).
SPECIAL = ("pad", "bos", "eos", "mask")


def _read_sample() -> list[tuple[str, ...]]:
    rows = []
    for line in SAMPLE_PATH.read_text(encoding="utf-8").splitlines():
        rows.append(tuple(line.split("\t")))
    return rows


def load_pairs(a: str, b: str, split: str, *, quick: bool, cache_dir=None) -> list[tuple[str, str, str]]:
    """``[(ref, text_a, text_b)]`` of one split (``"train"``/``"validation"``)."""
    if quick:
        rows = _read_sample()
        ia, ib = 1 + _COLUMNS.index(a), 1 + _COLUMNS.index(b)
        want = split == "validation"
        return [(r[0], r[ia], r[ib]) for r in rows if lab_data._ref_in_validation(r[0], 10) == want]
    return lab_data.load_parallel_verses(a, b, split, cache_dir)


def build_tokenizer(texts: list[str], vocab_size: int) -> lab_data.Tokenizer:
    """Byte-level BPE with ``vocab_size`` ids trained on ``texts`` (train split only)."""
    return lab_data.train_tokenizer(texts, vocab_size=vocab_size)


@dataclass
class TaskData:
    """Padded id arrays: ``src``/``tgt`` ``(N, max_len)`` int32, pad 0, ``tgt = [bos, ..., eos]``;
    ``sources``/``refs`` the source and target texts (``refs`` for BLEU); ``vocab`` the model's
    vocabulary size."""

    src: np.ndarray
    tgt: np.ndarray
    sources: list[str]
    refs: list[str]
    vocab: int

    def __len__(self) -> int:
        return self.src.shape[0]


def _ids(tok: lab_data.Tokenizer, text: str) -> np.ndarray:
    # BPE ids shifted by one so that 0 is the pad id; specials follow the BPE ids
    return tok.encode(text, dtype=np.int32) + 1


def special_id(tok: lab_data.Tokenizer, name: str) -> int:
    """Id of a special token (``pad`` is 0; the others follow the shifted BPE ids)."""
    return 0 if name == "pad" else tok.vocab_size + SPECIAL.index(name)


def decode(tok: lab_data.Tokenizer, ids) -> str:
    """Text of shifted ids, stopping at the first id that is not a BPE id (eos, pad)."""
    out = []
    for i in np.asarray(ids).tolist():
        if not 1 <= i <= tok.vocab_size:
            break
        out.append(i - 1)
    return tok.decode(out)


def make_task(pairs, tok: lab_data.Tokenizer, max_len: int) -> TaskData:
    """Encode ``(ref, source, target)`` pairs; pairs whose source or target (with bos/eos) exceed
    ``max_len`` ids are left out."""
    bos, eos = special_id(tok, "bos"), special_id(tok, "eos")
    src, tgt, sources, refs = [], [], [], []
    for _, a, b in pairs:
        sa = np.concatenate([_ids(tok, a), [eos]])
        tb = np.concatenate([[bos], _ids(tok, b), [eos]])
        if len(sa) <= max_len and len(tb) <= max_len:
            src.append(np.pad(sa, (0, max_len - len(sa))))
            tgt.append(np.pad(tb, (0, max_len - len(tb))))
            sources.append(a)
            refs.append(b)
    vocab = tok.vocab_size + len(SPECIAL)
    if not src:
        raise ValueError(f"no verse pair fits max_len={max_len}")
    return TaskData(np.asarray(src, np.int32), np.asarray(tgt, np.int32), sources, refs, vocab)


def noised(task: TaskData, mask_id: int, rate: float, seed: int) -> TaskData:
    """Denoising pairs: source = target's tokens with spans (mean length 3) replaced by one
    ``mask_id`` each, about ``rate`` of the tokens; target unchanged."""
    rng = np.random.default_rng(seed)
    src = np.zeros_like(task.tgt)
    for row, t in enumerate(task.tgt):
        tokens = t[1:][t[1:] != 0]  # verse ids + eos, without bos
        out, i = [], 0
        while i < len(tokens) - 1:
            if rng.random() < rate / 3:
                out.append(mask_id)
                i += int(rng.integers(1, 6))
            else:
                out.append(tokens[i])
                i += 1
        out.append(tokens[-1])
        src[row, : len(out)] = out
    return TaskData(src, task.tgt, task.sources, task.refs, task.vocab)

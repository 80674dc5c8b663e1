"""The torch-free tokenizer must give open_clip's MobileCLIP-S2 token ids, id for id."""

from __future__ import annotations

import gzip
import hashlib
import html.entities
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from indexer.model.tokenizer import CONTEXT_LENGTH, VOCAB_FILE, Tokenizer

ROOT = Path(__file__).resolve().parents[1]
VOCAB_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"

# Ids produced by open_clip 3.3.0's get_tokenizer('MobileCLIP-S2'): they hold even where
# open_clip is not installed (the torch-free CI job).
GOLDEN = {
    "a photo of a dog": [49406, 320, 1125, 539, 320, 1929, 49407],
    "": [49406, 49407],
    "  A  PHOTO\tof\n\na DOG  ": [49406, 320, 1125, 539, 320, 1929, 49407],
    "&amp;lt;": [49406, 283, 49407],
    "<start_of_text>x": [49406, 49406, 343, 49407],
    "İstanbul": [49406, 328, 16384, 11231, 49407],
}


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.load()


@pytest.fixture(scope="module")
def reference():
    """open_clip's own tokenizer for MobileCLIP-S2 (skips where open_clip is absent)."""
    open_clip = pytest.importorskip("open_clip")
    return open_clip.get_tokenizer("MobileCLIP-S2")


def _outcome(fn, texts, context_length=CONTEXT_LENGTH):
    """The token ids as a list, or the exception type when tokenizing raises."""
    try:
        return np.asarray(fn(texts, context_length=context_length)).tolist()
    except Exception as err:  # compared, not swallowed: both sides must fail alike
        return type(err)


# ---- text strategies: every Unicode category plus the shapes that stress cleaning ----

_ENTITIES = sorted(html.entities.html5)  # "amp;", "lt", "NotNestedLessLess;", ...
_WORDS = ["dog", "photo", "of", "a", "the", "Golden", "RETRIEVER", "it's", "we'll", "2024"]

entities = st.one_of(
    st.sampled_from(_ENTITIES).map(lambda name: "&" + name),
    st.sampled_from(_ENTITIES).map(lambda name: "&amp;" + name),  # unescaped twice
    st.integers(0, 0x11_0000).map(lambda n: f"&#{n};"),
    st.integers(0, 0x11_0000).map(lambda n: f"&#x{n:X};"),
)
any_char = st.characters(codec=None, exclude_categories=())  # surrogates included
emoji = st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF)
combining = st.characters(categories=["Mn", "Mc", "Me"])
cjk = st.characters(min_codepoint=0x3000, max_codepoint=0x9FFF)
spaces = st.text(st.sampled_from(" \t\n\r\x0b\x0c\x1c\x85\xa0\u2028\u3000\u200b"), min_size=1)
specials = st.sampled_from(
    ["<start_of_text>", "<end_of_text>", "<START_of_text>", "<\u017ftart_of_text>", "'S", "'\u017f"]
)
mojibake = st.text(min_size=1).map(lambda s: s.encode("utf-8").decode("latin-1"))
fragment = st.one_of(
    st.text(any_char, max_size=8),
    st.text(st.one_of(emoji, combining, cjk, st.characters()), max_size=8),
    st.sampled_from(_WORDS),
    spaces,
    entities,
    specials,
    mojibake,
)
texts = st.lists(fragment, max_size=12).map("".join)
long_texts = st.lists(
    st.sampled_from([*_WORDS, "😀", "東京", "&amp;", " "]), min_size=60, max_size=400
).map(" ".join)
batches = st.lists(st.one_of(texts, long_texts), min_size=1, max_size=6)

_SETTINGS = settings(
    max_examples=1500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@_SETTINGS
@given(batch=batches)
@example(batch=[""])
@example(batch=["word " * 200])
@example(batch=["\U0001f469\u200d\U0001f469\u200d\U0001f467 a\u0301\u0301 \ud800 é"])
def test_matches_open_clip(tokenizer, reference, batch):
    assert _outcome(tokenizer.encode, batch) == _outcome(reference, batch)


@settings(max_examples=300, deadline=None)
@given(text=st.one_of(texts, long_texts), context_length=st.integers(2, 100))
def test_matches_open_clip_at_other_context_lengths(tokenizer, reference, text, context_length):
    expected = _outcome(reference, [text], context_length)
    assert _outcome(tokenizer.encode, [text], context_length) == expected


@pytest.mark.parametrize(("text", "ids"), GOLDEN.items())
def test_golden_ids(tokenizer, text, ids):
    row = tokenizer.encode(text)[0]
    assert row[: len(ids)].tolist() == ids
    assert not row[len(ids) :].any()


def test_shape_dtype_and_truncation(tokenizer):
    out = tokenizer.encode(["dog " * 500, "dog"])
    assert out.shape == (2, CONTEXT_LENGTH)
    assert out.dtype == np.int64
    assert out[0, 0] == tokenizer.sot_id
    assert out[0, -1] == tokenizer.eot_id  # truncated text still ends in <eot>
    assert (out[0, 1:-1] == 1929).all()
    assert tokenizer.encode([]).shape == (0, CONTEXT_LENGTH)


def test_special_ids_and_vocab_size(tokenizer):
    assert (tokenizer.sot_id, tokenizer.eot_id, tokenizer.vocab_size) == (49406, 49407, 49408)


def test_rejects_context_too_short(tokenizer):
    with pytest.raises(ValueError, match="context_length"):
        tokenizer.encode("dog", context_length=1)


def test_load_is_cached():
    assert Tokenizer.load() is Tokenizer.load()


def test_shipped_vocab_is_openais(reference):
    """The asset is byte-identical to the file open_clip (and OpenAI CLIP) ship."""
    shipped = ROOT / "indexer" / "model" / "assets" / VOCAB_FILE
    assert hashlib.sha256(shipped.read_bytes()).hexdigest() == VOCAB_SHA256
    upstream = Path(sys.modules["open_clip"].__file__).parent / VOCAB_FILE
    assert gzip.decompress(upstream.read_bytes()) == gzip.decompress(shipped.read_bytes())


def test_merges_are_pairs_and_make_distinct_tokens():
    """What the tokenizer's id arithmetic rests on: a merge's token has id 512 + its rank."""
    from indexer.model.tokenizer import _MERGE_COUNT, _SPECIALS, _byte_alphabet

    shipped = ROOT / "indexer" / "model" / "assets" / VOCAB_FILE
    lines = gzip.decompress(shipped.read_bytes()).decode("utf-8").split("\n")
    merges = lines[1 : _MERGE_COUNT + 1]
    assert len(merges) == _MERGE_COUNT
    assert all(len(line.split(" ")) == 2 and all(line.split(" ")) for line in merges)
    merged = {line.replace(" ", "") for line in merges}
    chars = _byte_alphabet().values()
    assert len(merged) == _MERGE_COUNT
    assert not merged & {*chars, *(c + "</w>" for c in chars), *_SPECIALS}


def test_import_does_not_pull_torch():
    """The cold search path imports this module; torch/open_clip would cost ~8 s."""
    code = (
        "import sys\n"
        "from indexer.model.tokenizer import Tokenizer\n"
        "Tokenizer.load().encode('a photo of a dog')\n"
        "heavy = {'torch', 'open_clip', 'torchvision', 'timm'} & set(sys.modules)\n"
        "print(sorted(heavy))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert run.stdout.strip() == "[]", run.stdout + run.stderr


def test_speed_report(tokenizer):
    """Not a timing assertion: prints load and per-query cost (pytest -s to see)."""
    started = time.perf_counter()
    Tokenizer.from_file(ROOT / "indexer" / "model" / "assets" / VOCAB_FILE)
    load_ms = (time.perf_counter() - started) * 1e3
    started = time.perf_counter()
    tokenizer.encode("a red bicycle leaning against a brick wall at dusk")
    query_ms = (time.perf_counter() - started) * 1e3
    print(f"\ntokenizer: load {load_ms:.1f} ms, one fresh query {query_ms:.2f} ms")

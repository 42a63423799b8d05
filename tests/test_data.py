"""Corpora, the train/validation split, token streams and their cache, the training loader and validation
batches, and the numbers bits per byte needs."""

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from models.training import data
from models.training import tokenizer as tk
from models.training.data import Corpus, TokenLoader, TokenStream


def corpus_of(*texts):
    return Corpus(tuple(f"doc{i}" for i in range(len(texts))), tuple(texts), "test")


def numbered_stream(n):
    """Token i is i, so every batch says exactly which part of the stream it came from."""
    return TokenStream(torch.arange(n, dtype=torch.int32), num_bytes=n)


@pytest.fixture(scope="module")
def small_corpus():
    """Twelve 2,000-character pieces of Hamlet."""
    hamlet = data.load_corpus(None).texts[data.load_corpus(None).names.index("tragedies/hamlet")]
    return corpus_of(*(hamlet[i * 2000:(i + 1) * 2000] for i in range(12)))


@pytest.fixture(scope="module")
def tokenizer(small_corpus):
    return tk.train_tokenizer(small_corpus.texts, 300)


# --- corpora -----------------------------------------------------------------------------------------------------

def test_default_corpus_is_plain_text_shakespeare():
    corpus = data.load_corpus(None)
    assert len(corpus) == 38 and corpus.num_bytes > 4_000_000
    assert corpus.names == tuple(sorted(corpus.names)) and "tragedies/hamlet" in corpus.names
    hamlet = corpus.texts[corpus.names.index("tragedies/hamlet")]
    assert hamlet.startswith("Hamlet\n\nACT I\n") and "To be, or not to be" in hamlet
    for name, text in zip(corpus.names, corpus.texts):
        lines = text.splitlines()
        assert not [line for line in lines if line.startswith("#")], name
        assert not [line for line in lines if line.endswith(" ")], name  # Markdown hard breaks
        for markup in ("**", "__", "\\[", "_Enter", "*Enter", "<", "|"):
            assert markup not in text, (name, markup)
    assert data.load_corpus() is corpus  # read once per process


def test_strip_markdown():
    markdown = ("# Title #\n\n**BERNARDO**  \nWho's there?\n\n_Enter Ghost,\nslowly_\n\n__\\[Aside]_\n"
                "- a *list* item\n> a quote\n\n| a | b |\n|---|:-:|\n| 1 | 2 |\n\n"
                "[a link](http://x) <b>bold</b> `code` snake_case 2 * 3 \\*stars\\*\n\n---\n")
    assert data.strip_markdown(markdown) == (
        "Title\n\nBERNARDO\nWho's there?\n\nEnter Ghost,\nslowly\n\n[Aside]\n"
        "a list item\na quote\n\na  b\n\n1  2\n\na link bold code snake_case 2 * 3 *stars*\n")


def test_text_file_and_markdown_file(tmp_path):
    (tmp_path / "a.txt").write_text("plain **kept** text\n")
    (tmp_path / "b.md").write_text("## Heading\n\n**bold**\n")
    assert data.load_corpus(tmp_path / "a.txt").texts == ("plain **kept** text\n",)
    corpus = data.load_corpus(str(tmp_path / "b.md"))
    assert corpus.names == ("b",) and corpus.texts == ("Heading\n\nbold\n",)


def test_directory_recursive_sorted_skipping_hidden_and_empty(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / ".git").mkdir()
    (tmp_path / "z.txt").write_text("zed")
    (tmp_path / "sub" / "a.md").write_text("*a*")
    (tmp_path / "b.txt").write_text("bee")
    (tmp_path / "empty.txt").write_text(" \n")
    (tmp_path / "notes.json").write_text("{}")
    (tmp_path / ".git" / "x.txt").write_text("hidden")
    corpus = data.load_corpus(tmp_path)
    assert corpus.names == ("b", "sub/a", "z") and corpus.texts == ("bee", "a\n", "zed")


def test_parquet_file_and_shards(tmp_path):
    pq.write_table(pa.table({"text": ["first", None, "second", ""], "id": [1, 2, 3, 4]}), tmp_path / "s0.parquet")
    pq.write_table(pa.table({"text": ["third"]}), tmp_path / "s1.parquet")
    assert data.load_corpus(tmp_path / "s0.parquet").texts == ("first", "second")
    corpus = data.load_corpus(tmp_path)
    assert corpus.texts == ("first", "second", "third")
    assert corpus.names == ("s0.parquet:0", "s0.parquet:2", "s1.parquet:0")


def test_corpus_errors(tmp_path):
    with pytest.raises(data.CorpusNotFoundError, match="no such file") as err:
        data.load_corpus(tmp_path / "missing")
    assert isinstance(err.value, FileNotFoundError)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(data.CorpusError, match="no text"):
        data.load_corpus(tmp_path / "empty.txt")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "data.json").write_text("{}")
    with pytest.raises(data.CorpusError, match="no .txt/.md/.parquet files"):
        data.load_corpus(tmp_path / "other")
    with pytest.raises(data.CorpusError, match="unsupported file type '.json'"):
        data.load_corpus(tmp_path / "other" / "data.json")
    pq.write_table(pa.table({"content": ["x"], "url": ["y"]}), tmp_path / "shard.parquet")
    with pytest.raises(data.CorpusError, match=r"shard.parquet: .* without a 'text' column .*\['content', 'url'\]"):
        data.load_corpus(tmp_path / "shard.parquet")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(data.CorpusError, match="not UTF-8"):
        data.load_corpus(tmp_path / "latin1.txt")


# --- the split ---------------------------------------------------------------------------------------------------

def test_split_is_deterministic_disjoint_and_order_free():
    corpus = data.load_corpus(None)
    train, val = corpus.split()
    assert corpus.split() == (train, val)
    assert len(val) == 2 and len(train) == 36  # round(5% of 38)
    assert set(train.names).isdisjoint(val.names) and set(train.names) | set(val.names) == set(corpus.names)
    assert not set(val.texts) & set(train.texts)
    order = list(range(len(corpus)))
    random.Random(0).shuffle(order)
    shuffled = Corpus(tuple(corpus.names[i] for i in order), tuple(corpus.texts[i] for i in order), "shuffled")
    assert set(shuffled.split()[1].names) == set(val.names)


def test_split_guarantees_both_sides_and_keeps_duplicates_together():
    train, val = corpus_of("one", "two").split(0.01)
    assert len(train) == 1 and len(val) == 1
    train, val = corpus_of("one", "two", "three").split(0.99)
    assert len(train) == 1 and len(val) == 2
    train, val = corpus_of(*["same"] * 5, *[f"other {i}" for i in range(20)]).split(0.5)
    assert "same" not in val.texts or "same" not in train.texts


def test_single_document_splits_by_characters_at_a_line_break():
    text = "".join(f"line {i}\n" for i in range(100))
    train, val = corpus_of(text).split(0.1)
    assert train.texts[0] + val.texts[0] == text
    assert train.texts[0].endswith("\n") and 0.08 < len(val.texts[0]) / len(text) < 0.12
    train, val = corpus_of("no line breaks at all").split(0.5)
    assert train.texts[0] + val.texts[0] == "no line breaks at all" and train.texts[0] and val.texts[0]
    with pytest.raises(data.CorpusError, match="cannot be split"):
        corpus_of("x").split()
    with pytest.raises(data.CorpusError, match="val_fraction"):
        corpus_of("a", "b").split(1.0)


# --- token streams -----------------------------------------------------------------------------------------------

def test_token_stream_puts_bos_before_every_document(small_corpus, tokenizer):
    stream = data.token_stream(small_corpus, tokenizer)
    bos = tokenizer.get_bos_token_id()
    assert stream.tokens.dtype == torch.int32 and stream.tokens[0] == bos
    assert int((stream.tokens == bos).sum()) == len(small_corpus)
    assert tokenizer.decode(stream.tokens.tolist()) == "".join("<|bos|>" + t for t in small_corpus.texts)


def test_token_stream_cache_is_reused_and_keyed(tmp_path, small_corpus, tokenizer, monkeypatch):
    first = data.token_stream(small_corpus, tokenizer, tmp_path)
    [cache] = tmp_path.glob("tokens-*.pt")
    monkeypatch.setattr(data, "_encode", lambda *args: pytest.fail("tokenized again despite the cache"))
    assert torch.equal(data.token_stream(small_corpus, tokenizer, tmp_path).tokens, first.tokens)
    monkeypatch.undo()
    data.token_stream(corpus_of("different text"), tokenizer, tmp_path)
    data.token_stream(small_corpus, tk.train_tokenizer(small_corpus.texts, 280), tmp_path)
    assert len(list(tmp_path.glob("tokens-*.pt"))) == 3
    cache.write_bytes(b"damaged")
    assert torch.equal(data.token_stream(small_corpus, tokenizer, tmp_path).tokens, first.tokens)


def test_validation_tokens_decode_to_the_texts_bytes(tmp_path):
    """On the default corpus's validation split: the tokens decode to exactly the text's bytes (what bits per byte
    divides by)."""
    tokenizer = data.default_tokenizer(tmp_path, 512)
    _, val = data.load_corpus(None).split()
    stream = data.token_stream(val, tokenizer, tmp_path)
    assert stream.num_bytes == val.num_bytes > 0 and stream.num_tokens > 0
    token_bytes = tokenizer.token_bytes()
    assert int(token_bytes[stream.tokens.long()].sum()) == stream.num_bytes


# --- the training loader -----------------------------------------------------------------------------------------

def test_loader_batches_are_shifted_long_tensors():
    loader = TokenLoader(numbered_stream(1000), batch_size=3, seq_len=8)
    inputs, targets = next(loader)
    assert inputs.shape == targets.shape == (3, 8) and inputs.dtype == targets.dtype == torch.long
    assert torch.equal(targets, inputs + 1)
    assert torch.equal(inputs.flatten(), torch.arange(24))
    assert torch.equal(next(loader)[0].flatten(), torch.arange(24, 48))


def test_loader_wraps_into_the_next_epoch():
    loader = TokenLoader(numbered_stream(101), batch_size=2, seq_len=10)
    batches = [next(loader) for _ in range(6)]  # (101 - 1) // 20 = 5 batches per epoch
    assert loader.state_dict()["epoch"] == 1
    assert torch.equal(batches[5][0], batches[0][0])


def test_loader_state_resumes_the_identical_next_batch():
    loader = TokenLoader(numbered_stream(500), batch_size=2, seq_len=16)
    for _ in range(17):  # into the second epoch
        next(loader)
    state = json.loads(json.dumps(loader.state_dict()))  # plain ints, JSON-serializable
    expected = [next(loader) for _ in range(3)]
    resumed = TokenLoader(numbered_stream(500), batch_size=2, seq_len=16)
    resumed.load_state_dict(state)
    for want, got in zip(expected, (next(resumed) for _ in range(3))):
        assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_take_disjoint_slices_of_the_single_process_batch(world_size):
    stream = numbered_stream(1000)
    single = TokenLoader(stream, batch_size=2 * world_size, seq_len=8)
    ranks = [TokenLoader(stream, batch_size=2, seq_len=8, rank=r, world_size=world_size) for r in range(world_size)]
    for _ in range(25):  # past an epoch boundary
        inputs, targets = next(single)
        parts = [next(loader) for loader in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), inputs)
        assert torch.equal(torch.cat([p[1] for p in parts]), targets)
        assert len({loader.offset for loader in ranks} | {single.offset}) == 1


def test_resume_with_another_world_size():
    single = TokenLoader(numbered_stream(1000), batch_size=4, seq_len=8)
    for _ in range(5):
        next(single)
    state = single.state_dict()
    ranks = [TokenLoader(numbered_stream(1000), batch_size=2, seq_len=8, rank=r, world_size=2) for r in range(2)]
    for loader in ranks:
        loader.load_state_dict(state)
    assert torch.equal(torch.cat([next(loader)[0] for loader in ranks]), next(single)[0])


def test_loader_errors():
    stream = numbered_stream(100)
    with pytest.raises(data.CorpusError, match="one batch needs 129 tokens"):
        TokenLoader(stream, batch_size=4, seq_len=32)
    with pytest.raises(data.CorpusError, match="batch_size=0"):
        TokenLoader(stream, batch_size=0, seq_len=4)
    with pytest.raises(data.CorpusError, match="rank=2"):
        TokenLoader(stream, batch_size=1, seq_len=4, rank=2, world_size=2)
    loader = TokenLoader(stream, batch_size=1, seq_len=4)
    for bad in ({}, None, {"epoch": 0, "offset": 100}, {"epoch": -1, "offset": 0}, {"epoch": 0.0, "offset": 0}):
        with pytest.raises(data.CorpusError, match="load_state_dict"):
            loader.load_state_dict(bad)


# --- validation batches ------------------------------------------------------------------------------------------

def test_validation_batches_are_fixed():
    stream = numbered_stream(101)
    first = list(stream.validation_batches(2, 10))
    assert len(first) == 5 and all(torch.equal(t, i + 1) for i, t in first)
    again = list(stream.validation_batches(2, 10))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert len(list(stream.validation_batches(2, 10, max_tokens=45))) == 2
    ranks = [list(stream.validation_batches(1, 10, rank=r, world_size=2)) for r in range(2)]
    assert all(torch.equal(torch.cat([r0[0], r1[0]]), full[0]) for r0, r1, full in zip(*ranks, first))
    with pytest.raises(data.CorpusError, match="one batch needs 21 tokens"):
        stream.validation_batches(2, 10, max_tokens=19)

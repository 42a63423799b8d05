"""The BPE tokenizer: nanochat's pattern, special tokens and directory format; round trips; the default cache."""

import pickle

import pytest
import tiktoken
import torch

from models.training import data
from models.training import tokenizer as tk

# nanochat/tokenizer.py's SPLIT_PATTERN, copied here so an edit of ours that drifts from it fails.
NANOCHAT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
NANOCHAT_SPECIALS = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
                     "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]

SAMPLES = [
    "",
    "To be, or not to be, that is the question:",
    "Unicode: 你好世界 🌍 café naïve Ωμέγα — “quotes” and ‘apostrophes’",
    "  leading and trailing  \t\n\n\r\n  whitespace \u00a0 and tabs\t\t",
    "Numbers: 0 7 42 123 4567 89012 3.14159 1e-9 -17",
    "Contractions: I'm, you're, it's, we'll, they've, he'd; SHOUTED I'M",
    "Special chars: @#$%^&*()[]{}<>|\\/~`",
    "text that looks special: <|bos|> and <|assistant_end|> stays text",
    "\x00 control \x07 chars \x1b[0m",
]


@pytest.fixture(scope="module")
def training_texts():
    corpus = data.load_corpus(None)
    return list(corpus.texts[:2]) + SAMPLES  # two plays: enough pairs for 500+ merges, in well under a second


@pytest.fixture(scope="module")
def tokenizer(training_texts):
    return tk.train_tokenizer(training_texts, 512)


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(tokenizer, text):
    ids = tokenizer.encode(text)
    assert all(isinstance(i, int) and 0 <= i < 512 for i in ids)
    assert tokenizer.decode(ids) == text


def test_special_token_strings_in_text_are_ordinary_text(tokenizer):
    ids = tokenizer.encode("<|bos|>")
    assert tokenizer.get_bos_token_id() not in ids and len(ids) > 1


def test_vocab_size_is_as_asked_with_specials_at_the_end(training_texts, tokenizer):
    assert tokenizer.get_vocab_size() == 512
    assert [tokenizer.encode_special(name) for name in NANOCHAT_SPECIALS] == list(range(512 - 9, 512))
    assert tokenizer.get_bos_token_id() == 512 - 9
    assert tokenizer.get_special_tokens() == set(NANOCHAT_SPECIALS)
    assert tokenizer.decode([tokenizer.get_bos_token_id()]) == "<|bos|>"
    assert tk.train_tokenizer(training_texts, tk.MIN_VOCAB_SIZE).get_vocab_size() == 265  # bytes + specials only


def test_pattern_and_specials_are_nanochats():
    assert tk.SPLIT_PATTERN == NANOCHAT_PATTERN
    assert list(tk.SPECIAL_TOKENS) == NANOCHAT_SPECIALS


def test_digits_split_in_pairs(tokenizer):
    """nanochat's pattern splits digit runs into pieces of at most 2 (GPT-4: 3)."""
    pieces = [tokenizer.decode([i]) for i in tokenizer.encode("1234567")]
    assert "".join(pieces) == "1234567" and all(len(p) <= 2 for p in pieces)


def test_encode_list_and_prepend(tokenizer):
    bos = tokenizer.get_bos_token_id()
    batch = tokenizer.encode(SAMPLES, prepend="<|bos|>")
    assert batch == [[bos] + tokenizer.encode(text) for text in SAMPLES]
    assert tokenizer.encode("hi", prepend=bos) == [bos] + tokenizer.encode("hi")
    end = tokenizer.encode_special("<|assistant_end|>")
    ids = tokenizer.encode("hi", prepend="<|user_start|>") + [end]
    assert tokenizer.decode(ids) == "<|user_start|>hi<|assistant_end|>"


def test_token_bytes_count_utf8_bytes(tokenizer):
    token_bytes = tokenizer.token_bytes()
    assert token_bytes.dtype == torch.int32 and token_bytes.shape == (512,)
    assert token_bytes[-9:].tolist() == [0] * 9 and (token_bytes[:-9] > 0).all()
    for text in SAMPLES:
        ids = tokenizer.encode(text, prepend="<|bos|>")
        assert int(token_bytes[ids].sum()) == len(text.encode())


def test_save_load_in_nanochats_format(tmp_path, tokenizer):
    tokenizer.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["token_bytes.pt", "tokenizer.json", "tokenizer.pkl"]
    with open(tmp_path / "tokenizer.pkl", "rb") as f:  # what nanochat's RustBPETokenizer.from_directory does
        encoding = pickle.load(f)
    assert isinstance(encoding, tiktoken.Encoding)
    assert encoding._pat_str == NANOCHAT_PATTERN
    assert encoding.encode_single_token("<|bos|>") == tokenizer.get_bos_token_id()
    assert torch.equal(torch.load(tmp_path / "token_bytes.pt"), tokenizer.token_bytes())

    loaded = tk.Tokenizer.load(tmp_path)  # from tokenizer.json
    assert loaded.fingerprint == tokenizer.fingerprint
    assert loaded.encode(SAMPLES, prepend="<|bos|>") == tokenizer.encode(SAMPLES, prepend="<|bos|>")
    (tmp_path / "tokenizer.json").unlink()  # nanochat's directory: the pickle alone, read when trusted
    assert tk.Tokenizer.load(tmp_path, trust_pickle=True).fingerprint == tokenizer.fingerprint


class Crafted:
    """A pickle that runs code when read: it creates the file `marker` (what an attacker's payload would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_crafted_pickle_in_a_tokenizer_directory_is_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "tokenizer.pkl").write_bytes(pickle.dumps(Crafted(marker)))
    with pytest.raises(tk.TokenizerError, match=r"only a pickle .* can run any code .* not read; if you trust this "
                                                r"directory, convert it once with `python -m models.training.tokenizer"):
        tk.Tokenizer.load(tmp_path)
    assert not marker.exists()
    (tmp_path / "tokenizer.json").write_text("{}")  # a tokenizer.json is read instead of the pickle, never both
    with pytest.raises(tk.TokenizerError, match="tokenizer.json: corrupt or not a tokenizer file"):
        tk.Tokenizer.load(tmp_path)
    assert not marker.exists()


def test_the_conversion_reads_a_trusted_pickle_once(tmp_path, tokenizer, capsys):
    tokenizer.save(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    assert tk.main([str(tmp_path)]) == 0 and (tmp_path / "tokenizer.json").is_file()
    assert tk.Tokenizer.load(tmp_path).fingerprint == tokenizer.fingerprint
    assert tk.main([]) == 2 and "usage" in capsys.readouterr().err


def test_fingerprint_tells_tokenizers_apart(training_texts, tokenizer):
    assert tk.train_tokenizer(training_texts, 512).fingerprint == tokenizer.fingerprint
    assert tk.train_tokenizer(training_texts, 400).fingerprint != tokenizer.fingerprint


def test_default_tokenizer_is_trained_once_on_the_training_split(tmp_path, monkeypatch):
    trained_on = []
    original = tk.train_tokenizer

    def counting(texts, vocab_size):
        trained_on.append(list(texts))
        return original(trained_on[-1], vocab_size)

    monkeypatch.setattr(tk, "train_tokenizer", counting)
    first = data.default_tokenizer(tmp_path, 512)
    second = data.default_tokenizer(tmp_path, 512)
    assert len(trained_on) == 1, "the second call retrained instead of reading the cache"
    assert second.fingerprint == first.fingerprint and second.get_vocab_size() == 512
    [directory] = tmp_path.iterdir()
    assert directory.name.startswith("tokenizer-512-")
    assert sorted(p.name for p in directory.iterdir()) == ["token_bytes.pt", "tokenizer.json", "tokenizer.pkl"]
    train, val = data.load_corpus(None).split()
    assert trained_on[0] == list(train.texts) and not set(val.texts) & set(trained_on[0])


def test_load_without_tokenizer_says_what_to_run(tmp_path):
    with pytest.raises(tk.TokenizerNotFoundError, match="train_tokenizer") as err:
        tk.Tokenizer.load(tmp_path)
    assert isinstance(err.value, FileNotFoundError) and "tokenizer.json" in str(err.value)


def test_load_refuses_foreign_files(tmp_path, tokenizer):
    (tmp_path / "tokenizer.pkl").write_bytes(b"not a pickle")
    with pytest.raises(tk.TokenizerError, match="corrupt"):
        tk.Tokenizer.load(tmp_path, trust_pickle=True)
    (tmp_path / "tokenizer.pkl").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(tk.TokenizerError, match="not a tiktoken Encoding"):
        tk.Tokenizer.load(tmp_path, trust_pickle=True)
    tokenizer.save(tmp_path)
    text = (tmp_path / "tokenizer.json").read_text()
    for broken in (text[:len(text) // 2], text.replace('"format": "layersolve', '"format": "other'), "[1, 2]"):
        (tmp_path / "tokenizer.json").write_text(broken)
        with pytest.raises(tk.TokenizerError, match="tokenizer.json: corrupt or not a tokenizer file"):
            tk.Tokenizer.load(tmp_path)


@pytest.mark.parametrize("vocab_size", [0, 100, 264, 300.0])
def test_vocab_size_too_small(vocab_size):
    with pytest.raises(tk.TokenizerError, match="at least 265"):
        tk.train_tokenizer(["some text"], vocab_size)


def test_vocab_size_too_large_for_the_text():
    with pytest.raises(tk.TokenizerError, match="give more text or a smaller vocab_size"):
        tk.train_tokenizer(["hello hello world"], 1000)


def test_bad_inputs(tokenizer):
    with pytest.raises(tk.TokenizerError, match="not a special token"):
        tokenizer.encode_special("<|eot|>")
    with pytest.raises(tk.TokenizerError, match="str or a list of str"):
        tokenizer.encode(42)
    with pytest.raises(tk.TokenizerError, match="has no <\\|bos\\|>"):
        tk.Tokenizer(tiktoken.Encoding("bare", pat_str=NANOCHAT_PATTERN, special_tokens={},
                                       mergeable_ranks={bytes([i]): i for i in range(256)}))

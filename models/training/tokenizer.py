"""BPE tokenizer as nanochat has it: trained with rustbpe, run with tiktoken.

Same split pattern, same special tokens in the same order at the end of the vocabulary, vocab size counted with
the special tokens, and nanochat's tokenizer directory (`tokenizer.pkl`: the pickled tiktoken Encoding;
`token_bytes.pt`: UTF-8 bytes per token id, 0 for special tokens, as scripts/tok_train.py writes it), so a
tokenizer trained here loads in nanochat and one trained there loads here.

A directory written here also holds `tokenizer.json`, the same Encoding as data (its split pattern, its merges'
ranks as base64 tokens, its special tokens), and that is what `Tokenizer.load` reads: unpickling a file can run
any code it holds, so a run folder someone sent is safe to open. nanochat's own directories have only the pickle;
`Tokenizer.load(directory, trust_pickle=True)` reads it, and `python -m models.training.tokenizer DIR` converts a
directory you trust once (it writes tokenizer.json beside the pickle).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import pickle
import sys
from functools import cached_property
from pathlib import Path
from typing import Iterable

import rustbpe
import tiktoken
import torch

from ..io import write_atomic, write_json

# nanochat's GPT-4-style pattern: digits are split in runs of at most 2 (GPT-4 uses 3).
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
# nanochat's special tokens, in its order: BOS begins every document; the rest render chat conversations.
SPECIAL_TOKENS = ("<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
                  "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>")
BOS = SPECIAL_TOKENS[0]
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # the 256 byte tokens, which BPE starts from, plus the specials
ENCODING_FILE, PICKLE_FILE, TOKEN_BYTES_FILE = "tokenizer.json", "tokenizer.pkl", "token_bytes.pt"
FORMAT = "layersolve tiktoken encoding 1"  # tokenizer.json's "format": what a reader checks first


class TokenizerError(ValueError):
    """A tokenizer that cannot be trained or loaded as asked: the message says why and what to do."""


class TokenizerNotFoundError(TokenizerError, FileNotFoundError):
    """The directory holds no tokenizer."""


class Tokenizer:
    """A tiktoken Encoding with nanochat's special tokens, and nanochat's RustBPETokenizer methods."""

    def __init__(self, encoding: tiktoken.Encoding):
        if BOS not in encoding.special_tokens_set:
            raise TokenizerError(f"the tiktoken Encoding {encoding.name!r} has no {BOS} token; nanochat "
                                 f"tokenizers have the special tokens {list(SPECIAL_TOKENS)}")
        self.encoding = encoding

    def get_vocab_size(self) -> int:
        return self.encoding.n_vocab

    def get_bos_token_id(self) -> int:
        return self.encode_special(BOS)

    def get_special_tokens(self) -> set[str]:
        return set(self.encoding.special_tokens_set)

    def encode_special(self, name: str) -> int:
        """The id of a special token such as "<|bos|>"."""
        try:
            return self.encoding.encode_single_token(name)
        except KeyError:
            raise TokenizerError(f"{name!r} is not a special token of this tokenizer; it has "
                                 f"{sorted(self.get_special_tokens())}") from None

    def encode(self, text: str | list[str], prepend: int | str | None = None) -> list[int] | list[list[int]]:
        """Ids of a text, or a list of ids per text for a list (encoded on all cores). Special-token strings
        in the text are encoded as ordinary text, as nanochat does; `prepend` (an id or a special token's name)
        goes before each text, e.g. prepend=BOS for a document."""
        first = [] if prepend is None else [prepend if isinstance(prepend, int) else self.encode_special(prepend)]
        if isinstance(text, str):
            return first + self.encoding.encode_ordinary(text)
        if isinstance(text, list) and all(isinstance(t, str) for t in text):
            return [first + ids for ids in self.encoding.encode_ordinary_batch(text, num_threads=os.cpu_count() or 1)]
        raise TokenizerError(f"encode: text must be a str or a list of str, got {type(text).__name__}")

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode(ids)

    def token_bytes(self) -> torch.Tensor:
        """(vocab_size,) int32: how many UTF-8 bytes each token id decodes to, 0 for special tokens; what bits
        per byte needs (nanochat's token_bytes.pt)."""
        special = {self.encode_special(name) for name in self.get_special_tokens()}
        return torch.tensor([0 if i in special else len(self.encoding.decode_single_token_bytes(i))
                             for i in range(self.get_vocab_size())], dtype=torch.int32)

    @cached_property
    def fingerprint(self) -> str:
        """A hash of the split pattern, merges and special tokens: equal for tokenizers that encode alike, so
        it keys caches of token ids."""
        digest = hashlib.blake2b(self.encoding._pat_str.encode(), digest_size=16)
        for token, rank in sorted(self.encoding._mergeable_ranks.items(), key=lambda item: item[1]):
            digest.update(rank.to_bytes(4, "little") + len(token).to_bytes(2, "little") + token)
        for name, rank in sorted(self.encoding._special_tokens.items()):
            digest.update(rank.to_bytes(4, "little") + name.encode() + b"\0")
        return digest.hexdigest()

    def save(self, directory: str | Path) -> Path:
        """Write the tokenizer directory: token_bytes.pt and tokenizer.pkl (nanochat's), then tokenizer.json (each
        atomically; the file `load` reads last, so a directory with it is complete)."""
        directory = Path(directory)
        token_bytes = self.token_bytes()
        write_atomic(directory / TOKEN_BYTES_FILE, lambda f: torch.save(token_bytes, f))
        write_atomic(directory / PICKLE_FILE, lambda f: pickle.dump(self.encoding, f))
        e = self.encoding
        data = {"format": FORMAT, "name": e.name, "pattern": e._pat_str, "special_tokens": e._special_tokens,
                "ranks": {base64.b64encode(token).decode(): rank for token, rank in e._mergeable_ranks.items()}}
        write_json(directory / ENCODING_FILE, data)
        return directory

    @classmethod
    def load(cls, directory: str | Path, trust_pickle: bool = False) -> Tokenizer:
        """The tokenizer of a directory written by `save` (tokenizer.json, data only), or with trust_pickle=True
        of one written by nanochat (scripts/tok_train.py: tokenizer.pkl, a pickle, which can run code when read:
        only for directories you trust)."""
        directory = Path(directory)
        path, pickled = directory / ENCODING_FILE, directory / PICKLE_FILE
        if path.is_file():
            return cls(_encoding_from_json(path))
        if not pickled.is_file():
            raise TokenizerNotFoundError(
                f"{path}: no tokenizer here; train one with models.training.tokenizer.train_tokenizer(texts, vocab_size)"
                f".save({str(directory)!r}), use models.training.data.default_tokenizer(cache_dir, vocab_size), or run nanochat's "
                "`python -m scripts.tok_train` and point to its tokenizer directory")
        if not trust_pickle:
            raise TokenizerError(
                f"{directory}: the tokenizer is only a pickle ({PICKLE_FILE}, nanochat's format), and reading a pickle "
                f"can run any code it holds, so it is not read; if you trust this directory, convert it once with "
                f"`python -m models.training.tokenizer {directory}` (it writes {ENCODING_FILE} beside it)")
        try:
            with open(pickled, "rb") as f:
                encoding = pickle.load(f)
        except Exception as err:  # pickle raises many types for truncated or foreign files
            raise TokenizerError(f"{pickled}: corrupt or not a pickled tiktoken Encoding ({type(err).__name__}: "
                                 f"{err}); delete it and train the tokenizer again") from err
        if not isinstance(encoding, tiktoken.Encoding):
            raise TokenizerError(f"{pickled}: holds a {type(encoding).__name__}, not a tiktoken Encoding")
        return cls(encoding)


def _encoding_from_json(path: Path) -> tiktoken.Encoding:
    """The Encoding of a tokenizer.json, every field checked: a corrupt or foreign file is named, not half-read."""
    try:
        data = json.loads(path.read_bytes())
        if data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {FORMAT!r}")
        ranks = {base64.b64decode(token, validate=True): int(rank) for token, rank in data["ranks"].items()}
        specials = {str(name): int(rank) for name, rank in data["special_tokens"].items()}
        return tiktoken.Encoding(name=str(data["name"]), pat_str=str(data["pattern"]), mergeable_ranks=ranks,
                                 special_tokens=specials)
    except Exception as err:  # JSON, base64, missing keys, tiktoken's own checks: one message for all
        raise TokenizerError(f"{path}: corrupt or not a tokenizer file ({type(err).__name__}: {err}); delete the "
                             f"tokenizer directory and train it again") from None


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a BPE of vocab_size tokens in all: 256 byte tokens, vocab_size - 265 merges learned from the texts,
    then nanochat's 9 special tokens at the end (ids vocab_size - 9 ..)."""
    if type(vocab_size) is not int or vocab_size < MIN_VOCAB_SIZE:
        raise TokenizerError(f"vocab_size={vocab_size!r} is too small: it must hold the 256 byte tokens and the "
                             f"{len(SPECIAL_TOKENS)} special tokens, so at least {MIN_VOCAB_SIZE}")
    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(iter(texts), vocab_size - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
    ranks = {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}
    if len(ranks) < vocab_size - len(SPECIAL_TOKENS):
        raise TokenizerError(f"vocab_size={vocab_size}: the training text only has enough distinct pairs for "
                             f"{len(ranks) + len(SPECIAL_TOKENS)} tokens; give more text or a smaller vocab_size")
    specials = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
    return Tokenizer(tiktoken.Encoding(name="rustbpe", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks,
                                       special_tokens=specials))


def training_key(texts: tuple[str, ...]) -> str:
    digest = hashlib.blake2b("\0".join((SPLIT_PATTERN, *SPECIAL_TOKENS)).encode(), digest_size=6)
    for text in texts:
        digest.update(hashlib.blake2b(text.encode(), digest_size=16).digest())
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> int:
    """`python -m models.training.tokenizer DIR`: convert nanochat's pickled tokenizer directory, which you trust,
    to tokenizer.json (read without unpickling from then on)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m models.training.tokenizer DIR  (a tokenizer directory you trust: its tokenizer.pkl "
              "is unpickled once, and tokenizer.json written beside it)", file=sys.stderr)
        return 2
    try:
        Tokenizer.load(argv[0], trust_pickle=True).save(argv[0])
    except TokenizerError as err:
        print(err, file=sys.stderr)
        return 2
    print(f"wrote {Path(argv[0]) / ENCODING_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

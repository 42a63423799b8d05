"""Checkpoints in nanochat's format: `model_<step:06d>.pt` (a state_dict) + `meta_<step:06d>.json` (with
`model_config`), as karpathy/nanochat and the SNLP fork write and read them.

Loading patches what older checkpoints lack with nanochat's neutral defaults (window_pattern "L"; resid lambdas 1;
x0 lambdas, smear, backout, value embeddings and their gates 0), strips torch.compile's `_orig_mod.` prefix, and
refuses anything else that does not fit with an error naming the file and the offending keys. Saving is atomic
(the meta first, then the weights, each through a temporary file), and writes the fork's config fields only when
they differ from the defaults, so a plain model's checkpoint also loads in upstream nanochat.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Callable

import torch

from ..io import write_atomic, write_json

from .block import rotary_tables
from .config import GPTConfig, has_ve
from .gpt import GPT

UPSTREAM_FIELDS = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "window_pattern")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked: the message names the file and what does not fit."""


def steps(directory: str | Path) -> list[int]:
    """The steps with a model file in the directory, ascending."""
    return sorted(int(m.group(1)) for p in Path(directory).glob("model_*.pt")
                  if (m := re.fullmatch(r"model_(\d+)\.pt", p.name)))


def paths(directory: str | Path, step: int) -> tuple[Path, Path]:
    directory = Path(directory)
    return directory / f"model_{step:06d}.pt", directory / f"meta_{step:06d}.json"


SHAPE_FIELDS = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd")  # what nanochat writes


def read_config(meta_path: Path) -> GPTConfig:
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{meta_path}: missing (every model_<step>.pt needs its meta_<step>.json)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{meta_path}: not valid JSON ({err})") from err
    config = meta.get("model_config") if isinstance(meta, dict) else None
    if not isinstance(config, dict):
        raise CheckpointError(f"{meta_path}: has no 'model_config' object")
    unknown = sorted(set(config) - GPTConfig.field_names())
    if unknown:
        raise CheckpointError(f"{meta_path}: unknown model_config field(s) {unknown}; known: "
                              f"{sorted(GPTConfig.field_names())}")
    missing = [k for k in SHAPE_FIELDS if k not in config]
    if missing:  # a default would make another model, and the errors it leads to would name something else
        raise CheckpointError(f"{meta_path}: model_config has no {', '.join(map(repr, missing))} (every nanochat "
                              f"checkpoint records {', '.join(SHAPE_FIELDS)})")
    config.setdefault("window_pattern", "L")  # checkpoints from before sliding windows were all full-context
    try:
        return GPTConfig(**config)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{meta_path}: model_config does not make a valid GPTConfig ({err})") from err


def neutral_defaults(cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """The values nanochat's checkpoint manager gives keys that older checkpoints lack: they switch the newer
    features off."""
    L, D, V = cfg.n_layer, cfg.n_embd, cfg.padded_vocab_size
    out = {"resid_lambdas": torch.ones(L), "x0_lambdas": torch.zeros(L), "smear_gate.weight": torch.zeros(1, 24),
           "smear_lambda": torch.zeros(1), "backout_lambda": torch.zeros(1)}
    out.update({f"mtp_projs.{k}.weight": torch.zeros(D, D) for k in range(cfg.num_mtp_steps)})
    if not cfg.no_ve:
        for i in (i for i in range(L) if has_ve(i, L)):
            out[f"value_embeds.{i}.weight"] = torch.zeros(V, cfg.n_kv_head * cfg.head_dim)
            out[f"transformer.h.{i}.attn.ve_gate.weight"] = torch.zeros(cfg.n_kv_head, 12)
    return out


def load(directory: str | Path, step: int | None = None, device: str | torch.device = "cpu",
         dtype: torch.dtype = torch.float32, keep: Callable[[GPTConfig, str], bool] | None = None) -> GPT:
    """The model of `directory`'s checkpoint at `step` (default: the latest), with weights in `dtype`.

    keep(config, key): load only the state_dict keys it accepts (a stage of a model split across processes); the
    other parameters stay on the meta device, holding no memory, and since the file is memory-mapped their bytes
    are never read. The whole file is still checked against the config."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    available = steps(directory)
    if not available:
        raise CheckpointError(f"{directory}: no model_<step>.pt checkpoint")
    step = available[-1] if step is None else step
    if step not in available:
        raise CheckpointError(f"{directory}: no checkpoint for step {step}; steps: {available}")
    model_path, meta_path = paths(directory, step)
    cfg = read_config(meta_path)
    try:
        state = torch.load(model_path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        # Not torch's own message: it advises weights_only=False, which cannot read random bytes either and would
        # run whatever code a foreign pickle holds.
        raise CheckpointError(f"{model_path}: corrupt or not a model checkpoint (it does not load as a state_dict: "
                              f"{type(err).__name__})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{model_path}: not a state_dict (a dict of tensors)")
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    for key, value in neutral_defaults(cfg).items():
        state.setdefault(key, value)
    with torch.device("meta"):  # shapes only: the weights are the file's, each cast once to dtype
        model = GPT(cfg)
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        details = [f"missing keys {missing[:8]}" * bool(missing), f"unexpected keys {unexpected[:8]}" * bool(unexpected),
                   "shape mismatches " * bool(wrong) + ", ".join(
                       f"{k}: file {tuple(state[k].shape)} vs config {tuple(expected[k].shape)}" for k in wrong[:8])]
        raise CheckpointError(f"{model_path} does not match the model_config of {meta_path.name}: "
                              + "; ".join(d for d in details if d))
    # copies, not views of the mapped file, which a later save may replace
    model.load_state_dict({k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype, copy=True)
                           for k, v in state.items() if keep is None or keep(cfg, k)}, strict=keep is None,
                          assign=True)
    cos, sin = rotary_tables(model.rotary_len, cfg.head_dim)  # buffers, not in the file: built on the meta device
    model.cos, model.sin = cos.to(device), sin.to(device)
    return model


def config_dict(cfg: GPTConfig) -> dict:
    """nanochat's model_config: the upstream fields, plus the fork's (and ours) where they are not the default."""
    defaults = GPTConfig()
    return {k: v for k, v in dataclasses.asdict(cfg).items()
            if k in UPSTREAM_FIELDS or v != getattr(defaults, k)}


def save(model: GPT, directory: str | Path, step: int, meta: dict | None = None) -> Path:
    """Write model_<step>.pt and meta_<step>.json atomically; `meta` adds fields (step, val_bpb, ...)."""
    model_path, meta_path = paths(directory, step)
    write_json(meta_path, {"step": step, **(meta or {}), "model_config": config_dict(model.config)})
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    write_atomic(model_path, lambda f: torch.save(state, f))
    return model_path

"""The command line's option types and its training flags.

Every numeric option is checked at the edge by its type: a bad value stops argparse with "argument --depth: must be
an integer >= 1, got '0'", before any work. `train_config` maps the flags to a `TrainConfig`. A run records the
flags it was trained with in its checkpoints' meta, so that `snlp train --resume --out DIR` takes them from DIR:
`resumed_flags` fills in every flag not given and refuses a given one that disagrees.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import Callable

from .names import STRATEGIES, n_par_configs, strategy


INT_MAX = 2**63 - 1  # the largest integer torch (a seed, a size, a count) takes without overflowing


def bounded(kind: type, low: float, high: float | None = None) -> Callable[[str], int | float]:
    """An argparse type: `kind` (int or float) parsed from the text, finite, and in [low, high]; an integer at most
    INT_MAX."""
    noun = "an integer" if kind is int else "a number"
    allowed = f"{noun} >= {low}" if high is None else f"{noun} in [{low}, {high}]"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}") from None
        if kind is int and value > INT_MAX:
            raise argparse.ArgumentTypeError(f"must be {allowed} and at most 2**63 - 1, got {text!r}")
        if not math.isfinite(value) or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}")
        return value

    parse.__name__ = allowed  # what argparse would name the type in its own messages
    return parse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults formatter, every flag's default in `--help`: "(default: X)" after the help, also of a flag
    without help text, unless the help states its default itself ("(default 3; ...)"); a flag whose default is
    None or SUPPRESS, or a switch (store_true), shows none. Lists show as on the command line ("1 2 4")."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not shows_default(action) or STATED_DEFAULT.search(text):
            return text
        return f"{text} (default: {default_text(action.default).replace('%', '%%')})".lstrip()

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and shows_default(action):  # argparse prints no help line for a flag without help
            action = copy.copy(action)
            action.help = self._get_help_string(action)
        return super()._format_action(action)


STATED_DEFAULT = re.compile(r"\(default\b|%\(default\)")  # a help text that says its default itself


def shows_default(action: argparse.Action) -> bool:
    """Whether `--help` shows the default of `action`: a value, not None / SUPPRESS, nor a switch's False."""
    return (action.default is not None and action.default is not argparse.SUPPRESS
            and not isinstance(action.default, bool) and action.help is not argparse.SUPPRESS
            and (bool(action.option_strings) or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE)))


def default_text(value) -> str:
    """A default as it would be typed: a list's items space-separated, a path as its text."""
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def baseline_flag(p: argparse.ArgumentParser) -> None:
    """--eager-baseline: the speedups' baseline is the eager sequential forward alone, instead of the faster of the
    eager and the compiled one (torch.compile costs seconds to a minute per model before the first timing)."""
    p.add_argument("--eager-baseline", action="store_true",
                   help="time the speedups against the eager sequential forward only, skipping torch.compile (by "
                        "default the baseline is the faster of eager and compiled, the fastest sequential way)")


def device(text: str) -> str:
    """An argparse type: a torch device this machine has, "cpu" or "cuda[:N]"."""
    import torch

    try:
        kind = torch.device(text).type
    except RuntimeError:
        kind = None
    if kind not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"must be cpu, cuda or cuda:N, got {text!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        build = "" if torch.version.cuda else ", a CPU-only build"
        raise argparse.ArgumentTypeError(f"{text!r}: no CUDA device here (torch {torch.__version__}{build})")
    return text


def check_out(path: Path, directory: bool = False, flag: str = "--out") -> None:
    """Refuse, before any work, an output path that cannot be written: `path` a file (its folder is made), or with
    `directory` a folder. Its nearest existing ancestor must be a folder this process may write in."""
    folder = path if directory else path.parent
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if path.exists() and path.is_dir() != directory:
        raise ValueError(f"{flag} {path}: is {'not ' if directory else ''}a directory")
    if not existing.is_dir():
        raise ValueError(f"{flag} {path}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: cannot write in {existing}")


SIZE_FLAGS = ("depth", "width", "aspect_ratio", "seq_len", "batch_size", "vocab_size", "mhc")


def check_fits(cfg, args) -> None:
    """Refuse, before any work, a run this machine cannot hold: the training footprint of the config
    (training.config.footprint, an estimate from its shapes) against the memory of the device it trains on, naming
    the flags that set the size."""
    import torch

    from ..training.config import footprint

    need = footprint(cfg)
    if torch.cuda.is_available():
        memory, where = torch.cuda.get_device_properties(0).total_memory, "this GPU has"
    else:
        memory, where = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine has"
    if need.rotary_bytes > memory:
        raise ValueError(f"--seq-len {cfg.model.sequence_len}: the rotary tables alone (10 x sequence_len positions) "
                         f"would take {_gb(need.rotary_bytes)}, and {where} {_gb(memory)}")
    if need.total_bytes > memory:
        flags = " ".join(f"--{f.replace('_', '-')} {getattr(args, f)}" for f in SIZE_FLAGS if f in args.given)
        raise ValueError(f"{flags or f'--preset {args.preset}'}: a model of {need.parameters:.3g} parameters needs about "
                         f"{_gb(need.total_bytes)} to train (weights, gradients and optimizer state, "
                         f"{_gb(need.training_bytes)}; one batch's activations, {_gb(need.activation_bytes)}), and "
                         f"{where} {_gb(memory)}")


def _gb(n: int) -> str:
    return f"{n / 2**30:.3g} GiB"


def partners(args, rules: dict[str, tuple[Callable[[argparse.Namespace], bool], str]]) -> None:
    """Refuse a flag given on the line (args.given) that does nothing here: rules maps its destination to (whether
    it takes effect, given the other flags; what it needs)."""
    for dest, (works, needs) in rules.items():
        if dest in args.given and not works(args):
            raise ValueError(f"--{dest.replace('_', '-')} does nothing without {needs}")


POSITIVE = bounded(int, 1)
COUNT = bounded(int, 0)  # zero allowed: "none" or "only at the end", as each option's help says
WEIGHT = bounded(float, 0.0)
FRACTION = bounded(float, 0.0, 1.0)
MIN_TEMPERATURE = 1e-6


def temperature(text: str) -> float:
    """An argparse type: a sampling temperature, 0 (greedy) or at least MIN_TEMPERATURE. One so small that 1 / T
    overflows (5e-324) would make the probabilities NaN, and any below 1e-6 samples as greedily as 0 does."""
    value = WEIGHT(text)
    if 0 < value < MIN_TEMPERATURE:
        raise argparse.ArgumentTypeError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE:g}, got {text!r}")
    return value


HEAD_DIM = 64  # --width sizes heads of 64, as nanochat's small models
RUN_FLAGS = "flags"  # the key of the training flags in a checkpoint's meta
RESUME_MAY_CHANGE = ("steps", "save_every", "keep")  # how far and how often, not what is trained
NOT_RECORDED = ("command", "out", "resume", "overwrite", "given")


def model_flags(p: argparse.ArgumentParser) -> None:
    from ..training.config import PRESETS

    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="base configuration (default tiny)")
    p.add_argument("--steps", type=POSITIVE, help="optimizer steps")
    p.add_argument("--batch-size", type=POSITIVE, help="sequences per step, over all processes")
    p.add_argument("--seq-len", type=POSITIVE, help="context length (the model's sequence_len)")
    p.add_argument("--vocab-size", type=POSITIVE, help="tokenizer and model vocabulary")
    p.add_argument("--depth", type=POSITIVE, help="layers")
    p.add_argument("--aspect-ratio", type=POSITIVE, help="n_embd = depth * aspect ratio, rounded up to --head-dim")
    p.add_argument("--head-dim", type=POSITIVE, default=None, help="head dim for --aspect-ratio sizing (default 128)")
    p.add_argument("--width", type=POSITIVE, help=f"n_embd directly, a multiple of {HEAD_DIM} (heads of {HEAD_DIM})")
    p.add_argument("--no-x0-resid", action="store_true")
    p.add_argument("--no-ve", action="store_true")
    p.add_argument("--mhc", type=POSITIVE, metavar="STREAMS", help="hyper-connections with this many streams")
    p.add_argument("--mhc-dynamic", action="store_true", help="input-dependent (DeepSeek-style) hyper-connections")
    p.add_argument("--eval-every", type=COUNT, help="validation every this many steps (0: at the end only)")
    p.add_argument("--eval-tokens", type=POSITIVE)
    p.add_argument("--seed", type=COUNT)


def reg_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reg", choices=("none", *STRATEGIES), default="none",
                   help="SNLP-aware regularization surrogate: jacobi, idn, scaled, hcn (mHC), diagonal (Hutchinson); "
                        "none: no regularizer")
    p.add_argument("--reg-lambda", type=WEIGHT, default=1.0, help="weight of the regularizer (default 1)")
    p.add_argument("--n-par-configs", type=POSITIVE, nargs="+", help="tail lengths (default: L/4, L/2, 3L/4)")
    p.add_argument("--reg-stride", type=COUNT, default=1,
                   help="every stride-th tail layer and the last enter the loss (0: the published default, the last "
                        "block alone on h_(L-n), IDN only)")
    p.add_argument("--reg-warmup", type=FRACTION, default=0.2,
                   help="fraction of training over which lambda ramps up")
    p.add_argument("--reg-detach", action="store_true", help="detach the sequential target")
    p.add_argument("--reg-mode", choices=("all", "sample", "batched"), default="all",
                   help="all configs per step (published), one sampled config, or all in one batched call")
    p.add_argument("--reg-probes", type=POSITIVE, default=1, help="Hutchinson probes for --reg diagonal")


def train_config(args):
    """The TrainConfig the flags describe; a size the model cannot take is refused here, naming the flag."""
    from ..nanochat import GPTConfig
    from ..training.regularizer import Regularizer
    from ..training.config import PRESETS, gpu_model

    cfg = PRESETS[args.preset]
    model = cfg.model
    if args.depth is not None or args.aspect_ratio is not None or args.width is not None:
        depth = model.n_layer if args.depth is None else args.depth
        if args.width is not None:
            if args.width % HEAD_DIM:
                raise ValueError(f"--width must be a multiple of {HEAD_DIM} (heads of {HEAD_DIM}), got {args.width}")
            heads = args.width // HEAD_DIM
            model = dataclasses.replace(model, n_layer=depth, n_embd=args.width, n_head=heads, n_kv_head=heads)
        else:
            model = gpu_model(depth, args.aspect_ratio or 64, args.head_dim or 128, model.sequence_len,
                              model.vocab_size)
    options = {"sequence_len": args.seq_len, "vocab_size": args.vocab_size, "no_x0_resid": args.no_x0_resid or None,
               "no_ve": args.no_ve or None, "use_mhc": bool(args.mhc) or None, "mhc_num_streams": args.mhc,
               "mhc_dynamic": args.mhc_dynamic or None}
    model = GPTConfig(**{**dataclasses.asdict(model), **{k: v for k, v in options.items() if v is not None}})
    changes = {"steps": args.steps, "batch_size": args.batch_size, "eval_every": args.eval_every,
               "eval_tokens": args.eval_tokens, "seed": args.seed}
    cfg = dataclasses.replace(cfg, model=model, **{k: v for k, v in changes.items() if v is not None})
    if getattr(args, "reg", "none") != "none":
        configs = tuple(args.n_par_configs or n_par_configs(model.n_layer))
        reg = Regularizer(strategy(args.reg, args.reg_probes), configs, args.reg_stride, args.reg_detach,
                          args.reg_mode)
        cfg = dataclasses.replace(cfg, regularizer=reg, reg_lambda=args.reg_lambda, reg_warmup=args.reg_warmup)
    return cfg


def given(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The destinations that `argv` (a subcommand's own arguments) sets itself, not through a default: argparse
    leaves an attribute alone that the namespace already holds, unless an option on the line sets it."""
    unset = object()
    namespace = argparse.Namespace(**{a.dest: unset for a in parser._actions})
    parser.parse_args(argv, namespace=namespace)
    return {k for k, v in vars(namespace).items() if v is not unset}


def recorded(args) -> dict:
    """The flags a run records (JSON values; paths as strings)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in NOT_RECORDED}


def resumed_flags(args, given_flags: set[str]):
    """`args` for `--resume`: every flag not on the command line taken from the run's latest checkpoint, which
    must agree with every flag that is (except how far and how often to train and save). A run whose checkpoints
    record no flags (trained by the library) keeps the command line's, and `restore` compares the configs."""
    from ..nanochat import checkpoint

    steps = checkpoint.steps(args.out)
    if not steps:
        raise FileNotFoundError(f"--resume: no checkpoint in {args.out}; start without --resume")
    try:
        saved = json.loads(checkpoint.paths(args.out, steps[-1])[1].read_text()).get(RUN_FLAGS)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise ValueError(f"--resume: the meta of {args.out}'s step {steps[-1]} cannot be read ({err})") from None
    if saved is None:
        return args
    mine = recorded(args)
    clashes = [f"--{k.replace('_', '-')} {mine[k]!r} (the run has {saved[k]!r})" for k in sorted(given_flags)
               if k in saved and k not in RESUME_MAY_CHANGE and mine[k] != saved[k]]
    if clashes:
        raise ValueError(f"--resume: {args.out} was trained with other settings: {'; '.join(clashes)}. --resume "
                         "takes the run's own settings: leave these out")
    merged = {**saved, **{k: mine[k] for k in given_flags if k in mine}}
    return argparse.Namespace(**{**vars(args), **merged})

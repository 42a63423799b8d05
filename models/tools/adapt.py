"""`snlp adapt`: the command line of adaptation (models.training.adapt). The flags become a plan and a config here,
at the edge; then the texts (the corpus's training split to train on; its held-out split and samples the original
model writes itself to evaluate on), the before / after table, and the output: a Hugging Face directory that
`transformers` loads as an ordinary model (`--hf`), or a nanochat run folder; `adapt.json` beside it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from ..io import write_json
from ..training import evaluate
from .flags import COUNT, POSITIVE, WEIGHT, bounded
from .names import STRATEGIES, plan_name, strategy

RECORD = "adapt.json"
PROMPT = 16  # tokens of held-out text each sample of the original model starts from
CONTEXT = 128  # tokens per sequence by default, at most the model's


def add_parser(sub) -> None:
    p = sub.add_parser("adapt", help="train a model's segment to be accurate under its own parallel solve, the "
                                     "original model as the teacher (docs/adapt.md)")
    p.add_argument("checkpoint", type=Path, nargs="?", help="a nanochat run directory (model_*.pt, meta_*.json, "
                                                            "tokenizer/)")
    p.add_argument("--hf", type=Path, metavar="DIR", help="instead: a local Hugging Face model directory")
    p.add_argument("--out", type=Path,
                   help="output directory (needed): a Hugging Face model directory (--hf) or a run folder, and adapt.json")
    p.add_argument("--n-par", type=POSITIVE, help="the segment's length n (needed; `snlp plan` finds one)")
    p.add_argument("--start", type=COUNT, metavar="S", help="the segment's first block, 0-based (default: the tail)")
    p.add_argument("--strategy", choices=STRATEGIES, default="idn")
    p.add_argument("--iters", type=POSITIVE, default=1, help="K: the Newton iterations the model is adapted for")
    p.add_argument("--init", choices=("repeat", "one_step"), default="repeat")
    p.add_argument("--lora-rank", type=COUNT, default=0,
                   help="train rank-r LoRA adapters (peft, merged at the end) instead of the whole layers (0)")
    p.add_argument("--steps", type=POSITIVE, default=200)
    p.add_argument("--batch-size", type=POSITIVE, default=8)
    p.add_argument("--context", type=POSITIVE,
                   help=f"tokens per training and evaluation sequence (default {CONTEXT}, at most the model's)")
    p.add_argument("--lr", type=bounded(float, 1e-12),
                   help="AdamW's peak learning rate (default 1e-4; with --lora-rank 1e-3)")
    p.add_argument("--kl-parallel", type=WEIGHT, default=1.0, help="weight of KL(original || the parallel solve)")
    p.add_argument("--kl-sequential", type=WEIGHT, default=1.0,
                   help="weight of KL(original || the adapted model's own sequential forward)")
    p.add_argument("--gap", type=WEIGHT, default=0.1, help="weight of the SNLP regularizer on the segment's states")
    p.add_argument("--corpus", help="training text, a .txt/.md file, a directory or parquet shards; its held-out "
                                    "split is evaluated (default: the embedded Shakespeare)")
    p.add_argument("--eval-tokens", type=POSITIVE, default=8192, help="held-out tokens of each evaluation text")
    p.add_argument("--save-every", type=POSITIVE, default=50, help="checkpoint every this many steps")
    p.add_argument("--seed", type=COUNT, default=0)
    p.add_argument("--resume", action="store_true", help="continue the adaptation in --out from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace what a non-empty --out holds")


def config_of(args, model):
    """The flags' plan and AdaptConfig (strings to objects here), each error naming its flag."""
    from ..inference import snlp
    from ..training.adapt import AdaptConfig

    plan = snlp.Plan(n_par=args.n_par, jacobian=strategy(args.strategy), iters=args.iters, init=args.init,
                     start=args.start)
    cfg = AdaptConfig(plan, steps=args.steps, batch_size=args.batch_size, seq_len=args.context, lr=args.lr,
                      lora_rank=args.lora_rank, kl_parallel=args.kl_parallel, kl_sequential=args.kl_sequential,
                      gap=args.gap, save_every=args.save_every, seed=args.seed)
    try:
        cfg.check(model)
    except ValueError as err:
        flags = {"seq_len": "--context", "lora_rank": "--lora-rank", "kl_parallel": "--kl-parallel, --kl-sequential, "
                 "--gap", "Plan.": f"--n-par {args.n_par}" + ("" if args.start is None else f" --start {args.start}")}
        flag = next((f for key, f in flags.items() if str(err).startswith(key)), "")
        raise ValueError(f"{flag}: {err}" if flag else str(err)) from None
    return cfg


def check_output(args) -> None:
    """Before any work: an output this command can write, and one that would not destroy a run by accident."""
    from .flags import check_out

    if args.out is None:
        raise ValueError("give --out DIR: where the adapted model goes")
    if args.out.suffix.lower() == ".gguf":
        raise ValueError(f"--out {args.out}: adapt writes a Hugging Face directory (safetensors, config, tokenizer), "
                         "not GGUF; convert it afterwards (llama.cpp's convert_hf_to_gguf.py)")
    check_out(args.out, directory=True)
    if args.n_par is None:
        raise ValueError("give --n-par N: the length of the segment to adapt (`snlp plan` finds one)")
    if args.resume and args.overwrite:
        raise ValueError("--resume continues the adaptation in --out, --overwrite replaces it: give one of them")
    if args.out.exists() and any(args.out.iterdir()) and not (args.resume or args.overwrite):
        raise ValueError(f"--out {args.out} is not empty: give --resume to continue, --overwrite to replace it, or a "
                         "new directory")


def texts(args, model, tokenizer, device, cache: Path) -> tuple[object, dict[str, evaluate.Validation]]:
    """The training stream, and the evaluation texts: the corpus's held-out split, and samples of the original
    model (temperature 1, each from PROMPT held-out tokens; BOS-separated, so no target crosses two samples).
    `cache`: where token streams are kept."""
    from ..inference.decode import generate
    from ..training.data import CorpusError, TokenStream, load_corpus, token_stream

    train_text, val_text = load_corpus(args.corpus).split()
    train, val = token_stream(train_text, tokenizer, cache), token_stream(val_text, tokenizer, cache)
    if train.num_tokens < args.batch_size * args.context + 1:
        raise CorpusError(f"--corpus: its training split has {train.num_tokens} tokens, fewer than one batch of "
                          f"--batch-size x --context = {args.batch_size * args.context}")
    bytes_ = tokenizer.token_bytes()
    held_out = evaluate.Validation(val, bytes_, args.batch_size, args.context, args.eval_tokens)
    count = max(1, args.eval_tokens // args.context)
    prompts = val.tokens[:count * PROMPT].view(count, PROMPT).long().to(device)
    with torch.no_grad():
        new = generate(model, prompts, args.context - 1 - PROMPT, temperature=1.0, seed=args.seed)
    bos = torch.full((count, 1), tokenizer.get_bos_token_id(), dtype=torch.long, device=device)
    samples = torch.cat([*torch.cat([bos, prompts, new], dim=1), bos[0]]).cpu().int()  # a BOS ends the last one too
    stream = TokenStream(samples, int(bytes_[samples.long()].sum()))
    return train, {"held-out text": held_out,
                   "samples of the original": evaluate.Validation(stream, bytes_, args.batch_size, args.context, None)}


def table(model, original, plan, named: dict[str, evaluate.Validation]) -> dict:
    """Per text: the sequential and the plan's PPL, top-1 agreement and KL against the original's sequential
    forward, of `model`."""
    return {text: {"sequential": evaluate.plan_metrics(model, val, None, reference=original),
                   plan_name(plan): evaluate.plan_metrics(model, val, plan, reference=original)}
            for text, val in named.items()}


def table_text(before: dict, after: dict, plan) -> str:
    name = plan_name(plan)
    lines = [f"{'text':<26} {'model':<9} {'forward':<22} {'ppl':>9} {'top-1':>7} {'KL':>9}"]
    for text in before:
        for label, rows in (("original", before[text]), ("adapted", after[text])):
            for forward in ("sequential", name):
                r = rows[forward]
                lines.append(f"{text:<26} {label:<9} {forward:<22} {r['quality']['ppl']:>9.3f} "
                             f"{r['top1_agreement']:>7.3f} {r['kl']:>9.4f}")
    first = next(iter(before.values()))["sequential"]["quality"]
    lines += ["", f"ppl over {first['tokens']:,} text tokens per text, at context {first['context']}. top-1, KL: "
              "agreement of the logits' argmax with the original model's sequential forward, and KL(original || "
              "this), mean over positions."]
    return "\n".join(lines)


def write_output(out: Path, model, tokenizer, step: int, record: dict) -> None:
    """The adapted model into `out`: a Hugging Face directory (save_pretrained, the tokenizer) or a nanochat run
    (model, meta, tokenizer), each written in a temporary folder beside and moved in when complete; then
    adapt.json."""
    from .. import nanochat

    partial = out / ".adapted.partial"
    shutil.rmtree(partial, ignore_errors=True)
    if hasattr(model, "lm"):
        model.lm.save_pretrained(partial)
        tokenizer.tokenizer.save_pretrained(partial)
    else:
        nanochat.save(model, partial, step, meta={"adapt": record["config"]})
        tokenizer.save(partial / "tokenizer")
    for item in partial.iterdir():
        target = out / item.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(item, target)
    partial.rmdir()
    write_json(out / RECORD, record)


def run(args, model, tokenizer, source: Path, cache: Path) -> int:
    """`snlp adapt` on a loaded model (the CLI loads it: a run folder or --hf); `cache`: the token streams'."""
    from ..training.adapt import adapt

    args.context = args.context or min(CONTEXT, model.config.sequence_len)
    cfg = config_of(args, model)
    device = next(model.parameters()).device
    train, named = texts(args, model, tokenizer, device, cache)
    blocks = cfg.plan.segment(model.config.n_layer)
    print(f"adapting layers {blocks.start}-{blocks.stop - 1} for {plan_name(cfg.plan)}; evaluating the original")
    before = table(model, model, cfg.plan, named)
    adapted, metrics = adapt(model, train, cfg, args.out, resume=args.resume)  # `model` stays the original
    after = table(adapted, model, cfg.plan, named)
    text = table_text(before, after, cfg.plan)
    blocks = cfg.plan.segment(model.config.n_layer)
    record = {"source": str(source), "config": cfg.record(), "segment": [blocks.start, blocks.stop],
              "strategy": args.strategy, "iters": cfg.plan.iters, "before": before, "after": after,
              "metrics": metrics}
    write_output(args.out, adapted, tokenizer, cfg.steps, record)
    print(text)
    print(f"wrote {args.out} ({'a Hugging Face model directory' if hasattr(adapted, 'lm') else 'a run folder'}) and "
          f"{RECORD}")
    return 0


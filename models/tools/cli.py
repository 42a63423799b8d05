"""The `snlp` command: argparse at the edge, where strings become layersolve / model objects; library calls inside."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import torch

import layersolve as ls

from ..io import save_figure, write_atomic, write_json
from . import adapt, planner, staged, suite
from .flags import (COUNT, POSITIVE, RUN_FLAGS, WEIGHT, HelpFormatter, baseline_flag, check_fits, check_out, device,
                    given, model_flags, partners, recorded, reg_flags, resumed_flags, temperature, train_config)
from .names import STRATEGIES, n_par_configs, plan_name, strategy
from .speculation import compare
from ..training.runs import REG_LAMBDA, default_cache

CACHE = default_cache()  # tokenizers, tokenized corpora and the demo's trained runs: one place for every folder
HF_CONTEXT = 256  # tokens per sequence of `eval --hf` by default
# `snlp generate` samples by default; the library's generate (models.inference.decode) is greedy (temperature 0),
# and the command's --help says so
GEN_TEMPERATURE, GEN_TOP_K = 0.8, 50
MAX_TIMEOUT = 7 * 24 * 3600  # seconds `generate --stages` may wait for a rank


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="snlp", description="Layer-parallel inference (SNLP) with layersolve.",
                                     formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.commands = sub.choices  # each subcommand's own parser

    demo = sub.add_parser("demo", help="the main job: train a baseline and an IDN-regularized model on Shakespeare, "
                                       "evaluate Jacobi / IDN, write a report with plots")
    demo.add_argument("--out", type=Path, help="output directory (default: snlp-out/demo, snlp-out/demo-quick with "
                                               "--quick, snlp-out/demo-toy with --toy: each job its own)")
    demo.add_argument("--toy", action="store_true", help="only the quick layersolve demo on a random residual stack")
    demo.add_argument("--quick", action="store_true",
                      help="the whole story at toy size (the quick preset, under 2 minutes on a 2-core CPU)")
    model_flags(demo)
    demo.add_argument("--reg-lambda", type=WEIGHT, default=REG_LAMBDA)
    baseline_flag(demo)

    train = sub.add_parser("train", help="train a model (nanochat recipe, optional SNLP-aware regularization)")
    train.add_argument("--out", type=Path, default=Path("snlp-out/train"), help="run directory (checkpoints)")
    train.add_argument("--corpus", help="a .txt/.md file, a directory of them, or parquet shards (default: "
                                        "the embedded Shakespeare)")
    train.add_argument("--resume", action="store_true",
                       help="continue the run in --out from its last checkpoint, with the run's own settings (a flag "
                            "given must agree; --steps may grow)")
    train.add_argument("--overwrite", action="store_true", help="replace the run in a non-empty --out")
    train.add_argument("--save-every", type=COUNT,
                       help="checkpoint every this many steps (default: a tenth of the steps; 0: at the end only)")
    train.add_argument("--keep", type=POSITIVE, default=3,
                       help="checkpoints kept, the newest (default 3; the final one is always among them)")
    train.add_argument("--sft-n-par", type=POSITIVE, help="SNLP-forward fine-tuning: train through snlp.forward")
    train.add_argument("--sft-iters", type=POSITIVE, default=1, help="--sft-n-par: Newton iterations (default 1)")
    train.add_argument("--sft-strategy", choices=STRATEGIES, default="idn")
    train.add_argument("--init-from", help="checkpoint directory to start from (for fine-tuning)")
    model_flags(train)
    reg_flags(train)

    ev = sub.add_parser("eval", help="PPL / bpb of the sequential forward and a grid of SNLP plans")
    ev.add_argument("checkpoint", type=Path, nargs="?", help="a run directory (model_*.pt, meta_*.json, tokenizer/)")
    ev.add_argument("--hf", type=Path, metavar="DIR", help="instead: a local Hugging Face model directory (weights, "
                                                           "config, tokenizer; Llama, Mistral, Qwen2/3, Gemma2/3)")
    ev.add_argument("--step", type=COUNT)
    ev.add_argument("--corpus")
    ev.add_argument("--context", type=POSITIVE,
                    help=f"tokens per sequence (default: the model's sequence_len; with --hf, {HF_CONTEXT})")
    ev.add_argument("--batch-size", type=POSITIVE, default=8)
    ev.add_argument("--max-tokens", type=POSITIVE, default=32768)
    ev.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=["jacobi", "idn"])
    ev.add_argument("--n-par", type=POSITIVE, nargs="+", help="default: half the layers")
    ev.add_argument("--start", type=COUNT, nargs="+", metavar="S",
                    help="the parallel segment's first block (0-based), blocks S .. S + n_par - 1 between sequential "
                         "ones (default: the tail; `snlp plan` finds a segment)")
    ev.add_argument("--iters", type=COUNT, nargs="+", default=[1, 2, 4], help="0: the initial guess only")
    ev.add_argument("--inits", nargs="+", choices=("repeat", "one_step"), default=["repeat"])
    ev.add_argument("--fuse", type=POSITIVE, nargs="+", default=[1])
    ev.add_argument("--ar-prompts", type=COUNT, default=4, help="prompts for autoregressive agreement (0: skip)")
    ev.add_argument("--ar-new", type=POSITIVE, default=16)
    ev.add_argument("--repeats", type=POSITIVE, default=7, help="timed calls per plan for the speedup column")
    baseline_flag(ev)
    ev.add_argument("--out", type=Path, help="JSON path (default: <checkpoint>/eval.json)")

    study = sub.add_parser("study", help="the convergence study, figures and claims report of snlp demo, on any "
                                         "checkpoint")
    study.add_argument("checkpoint", type=Path, help="a run directory (model_*.pt, meta_*.json, tokenizer/)")
    study.add_argument("--baseline", type=Path,
                       help="an unregularized run of the same shape, for the regularization claim")
    study.add_argument("--corpus", help="validation text (default: the embedded Shakespeare's validation plays)")
    study.add_argument("--context", type=POSITIVE, help="tokens per sequence (default: the model's sequence_len)")
    study.add_argument("--batch-size", type=POSITIVE, default=8)
    study.add_argument("--max-tokens", type=POSITIVE, default=16384)
    baseline_flag(study)
    study.add_argument("--out", type=Path, help="directory for report.md, study.json and the figures (default: "
                                                "<checkpoint>/study)")

    planner.add_parser(sub)
    adapt.add_parser(sub)

    gen = sub.add_parser("generate", help="sample from a checkpoint, sequentially or with SNLP decoding",
                         description="Sample text from a checkpoint, sequentially or with SNLP decoding. The command "
                                     f"samples (--temperature {GEN_TEMPERATURE}, --top-k {GEN_TOP_K}); the library's "
                                     "models.inference.decode.generate is greedy by default (temperature=0.0): "
                                     "--temperature 0 gives its tokens.")
    gen.add_argument("checkpoint", type=Path)
    gen.add_argument("--prompt", default="ROMEO.")
    gen.add_argument("--max-new", type=POSITIVE, default=64, help="new tokens")
    gen.add_argument("--temperature", type=temperature, default=GEN_TEMPERATURE,
                     help="sampling temperature; 0: greedy, the default of the library's generate")
    gen.add_argument("--top-k", type=COUNT, default=GEN_TOP_K, help="sample among the k likeliest tokens; 0: no cut")
    gen.add_argument("--n-par", type=POSITIVE, help="SNLP decoding over this tail (default: sequential; with "
                                               "--speculative, half the layers)")
    gen.add_argument("--iters", type=POSITIVE, help="Newton iterations of the SNLP solve (default 2; with --speculative 1)")
    gen.add_argument("--start", type=COUNT, metavar="S", help="the parallel segment's first block (default: the tail)")
    gen.add_argument("--strategy", choices=STRATEGIES, help="the SNLP surrogate (default idn)")
    gen.add_argument("--seed", type=COUNT, default=0)
    gen.add_argument("--speculative", action="store_true",
                     help="self-speculative decoding: the SNLP plan drafts, the sequential model verifies (its "
                          "output, not the plan's); prints acceptance and the speedup over eager sequential decoding")
    gen.add_argument("--draft-len", type=POSITIVE, metavar="B", help="--speculative: tokens drafted per round (default 4)")
    staged.add_flags(gen)

    bench = sub.add_parser("bench", help="prefill and decoding: sequential vs SNLP plans, JSON + tables")
    bench.add_argument("--preset", choices=sorted(suite.PRESETS), default=None,
                       help="shapes and settings: cpu (this machine's tables, < 5 min), gpu-0.5b (depth 32, dim 640, "
                            "T 512 and 2048, decode at batch 1 and 8), tiny (a smoke run); default: gpu-0.5b on "
                            "CUDA, else cpu")
    bench.add_argument("--out", type=Path, default=Path("snlp-out/bench"), help="directory for bench.json / .md")
    bench.add_argument("--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu")
    bench.add_argument("--repeats", type=POSITIVE,
                       help="a run or --hf: timed calls per plan; --train: timed steps per mode (default 5)")
    bench.add_argument("checkpoint", type=Path, nargs="?",
                       help="a trained run directory: the grid of `snlp eval` (Jacobi / IDN, K = 1, 2, 4 over the last "
                            "half) at batch 1 x --tokens, PPL and top-1 agreement on held-out text beside each plan's "
                            "speedup, with --repeats timed calls per plan")
    bench.add_argument("--hf", type=Path, metavar="DIR", help="instead: a local Hugging Face model directory, the same")
    bench.add_argument("--tokens", type=POSITIVE,
                       help="a run or --hf: tokens per sequence (default 256, at most the model's context)")
    baseline_flag(bench)
    bench.add_argument("--start", type=COUNT, nargs="+", metavar="S",
                       help="a run or --hf: the parallel segments' first blocks (default: the tail)")
    bench.add_argument("--train", action="store_true",
                       help="time training steps instead: plain vs the IDN regularizer in modes all / sample / "
                            "batched, on the tiny preset (configs L/4, L/2, 3L/4)")
    for command in parser.commands.values():  # every default in --help, the subcommands of other modules' too
        command.formatter_class = HelpFormatter
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    args = parser.parse_args(argv)
    # which flags the line gives itself: --resume takes the others from the run, and a flag that does nothing
    # without its partner is refused
    args.given = given(parser.commands[args.command], argv[argv.index(args.command) + 1:])
    try:
        code = {"demo": _demo, "train": _train, "eval": _eval, "plan": _plan, "adapt": _adapt, "study": _study,
                "generate": _generate, "bench": _bench}[args.command](args)
        sys.stdout.flush()  # a closed pipe fails here, in the handler below, not in Python's flush at exit
        return code
    except (ValueError, FileNotFoundError, ls.SolveError) as err:  # bad input: the message, not a traceback
        print(f"snlp {args.command}: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`snlp eval ... | head -1`): stop quietly, as a pipe expects
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 141  # 128 + SIGPIPE, what a shell reports for a writer the pipe stopped


def _demo(args) -> int:
    from . import demo, study

    out = args.out or Path("snlp-out/demo-toy" if args.toy else "snlp-out/demo-quick" if args.quick else "snlp-out/demo")
    check_out(out, directory=True)
    toy = demo.ToyConfig()
    if args.toy:
        toy = demo.ToyConfig(layers=toy.layers if args.depth is None else args.depth,
                             width=toy.width if args.width is None else args.width,
                             seed=toy.seed if args.seed is None else args.seed)
        demo.run_toy(out, toy)
        return 0
    if args.quick:
        args.preset = "quick"
    cfg = train_config(args)
    demo.run_models(out, cfg, demo.regularizer_of(cfg.model.n_layer), args.reg_lambda, CACHE,
                    study.StudyConfig(timing_compile=not args.eager_baseline))
    return 0


def _train(args) -> int:
    from .. import nanochat
    from ..inference import snlp
    from ..training.evaluate import describe
    from ..training.loop import Data, Interrupted, train

    check_out(args.out, directory=True)
    if args.resume and args.overwrite:
        raise ValueError("--resume continues the run in --out, --overwrite replaces it: give one of them")
    if args.resume:
        args = resumed_flags(args, args.given)
    partners(args, {"reg_lambda": (lambda a: a.reg != "none", "--reg"),
                    "sft_iters": (lambda a: a.sft_n_par, "--sft-n-par"),
                    "sft_strategy": (lambda a: a.sft_n_par, "--sft-n-par")})
    cfg = train_config(args)
    check_fits(cfg, args)
    if args.resume and (done := nanochat.steps(args.out)[-1]) >= cfg.steps:
        raise ValueError(f"--resume: {args.out} is already at step {done} >= --steps {cfg.steps}: give more --steps "
                         f"to train further")
    if args.sft_n_par:
        cfg = dataclasses.replace(cfg, sft_plan=snlp.Plan(n_par=args.sft_n_par, iters=args.sft_iters,
                                                          jacobian=strategy(args.sft_strategy)))
        _check_plan(cfg.sft_plan, argparse.Namespace(config=cfg.model), "--sft-n-par")
    save_every = max(1, cfg.steps // 10) if args.save_every is None else args.save_every
    cfg = dataclasses.replace(cfg, save_every=save_every, keep_checkpoints=args.keep, init_from=args.init_from)
    cfg.check()  # before the corpus is tokenized: a plan the model cannot take fails now, not after the work
    data = Data.prepare(args.corpus, cfg.model.vocab_size, CACHE)
    try:
        metrics = train(cfg, data, args.out, resume=args.resume, overwrite=args.overwrite,
                        notes={RUN_FLAGS: recorded(args)})
    except Interrupted as stop:  # a checkpoint of the step is saved: the message, not a traceback
        print(f"interrupted at step {stop.step}; continue with --resume", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # a second signal: stopped at once, mid-step
        print(f"stopped at once; --resume continues from the last checkpoint in {args.out}, if any", file=sys.stderr)
        return 130
    if int(os.environ.get("RANK", "0")) > 0:  # under torchrun, rank 0 speaks for the run
        return 0
    final = metrics["evals"][-1]
    print(f"validation loss {final['loss']:.4f}, bpb {final['bpb']:.4f}, {describe(final)}; run in {args.out}")
    if metrics["skipped_steps"]:
        print(f"{metrics['skipped_steps']} steps skipped: their SNLP solve did not end ok", file=sys.stderr)
    return 0


def _load_run(directory: Path, step=None):
    from .. import nanochat
    from ..training.tokenizer import Tokenizer

    model = nanochat.load(directory, step).eval()
    tokenizer = Tokenizer.load(directory / "tokenizer")
    if tokenizer.get_vocab_size() != model.config.vocab_size:
        raise ValueError(f"{directory / 'tokenizer'} has {tokenizer.get_vocab_size()} tokens but the model's "
                         f"vocab_size is {model.config.vocab_size}: use the tokenizer the model was trained with")
    return model, tokenizer


def _eval(args) -> int:
    from . import bench
    from ..training import evaluate
    from ..inference import snlp

    # a Hugging Face model's max_position_embeddings is thousands of tokens: HF_CONTEXT by default
    model, source, val = _model_and_validation(args, lambda m: HF_CONTEXT if args.hf else m.config.sequence_len,
                                               "eval.json")
    context = val.seq_len
    L = model.config.n_layer
    plans = [snlp.Plan(n_par=n, jacobian=strategy(s), iters=k, init=i, fuse=f, start=st)
             for s in args.strategies for n in (args.n_par or [L // 2]) for st in (args.start or [None])
             for k in args.iters for i in args.inits for f in args.fuse]
    for plan in plans:
        _check_plan(plan, model)
    named = {plan_name(p): p for p in plans}
    rows = evaluate.grid(model, val, named)
    first = next(iter(val.batches()))[0]
    # batch 1, as the study and the demo
    speed = bench.speedups(model, first[:1], named, repeats=args.repeats, compile=not args.eager_baseline)
    results = {"checkpoint": str(source), "environment": bench.environment(first.device), "context": context,
               "tokens": args.max_tokens, "grid": rows, "speed": speed}
    if args.ar_prompts:
        prompts = next(iter(val.stream.validation_batches(args.ar_prompts, 32)))[0]
        results["autoregressive_agreement"] = {
            plan_name(p): evaluate.autoregressive_agreement(model, prompts, args.ar_new, p)
            for p in plans if p.fuse == 1 and p.init == "repeat"}
    out = args.out or source / "eval.json"
    write_json(out, results)
    print(evaluate.grid_table(rows, speed))
    for name, rate in results.get("autoregressive_agreement", {}).items():
        print(f"autoregressive agreement, {name}: {rate:.3f}")
    print(f"wrote {out}")
    return 0


def _model_and_validation(args, context, out_name: str):
    """The model of a run directory or of --hf DIR, where it came from, and the validation text at --context
    tokens per sequence (default: context(model)); --out (default: out_name beside the model) is checked first."""
    if (args.checkpoint is None) == (args.hf is None):
        raise ValueError("give a run directory or --hf DIR" + ("" if args.hf is None else ", not both"))
    check_out(args.out or (args.checkpoint or args.hf) / out_name)
    if args.hf is not None:
        from .. import hf

        model, tokenizer = hf.load(args.hf)
    else:
        model, tokenizer = _load_run(args.checkpoint, args.step)
    args.context = args.context or context(model)
    return model, args.checkpoint or args.hf, _validation(args, model, tokenizer)


def _plan(args) -> int:
    model, source, val = _model_and_validation(args, lambda m: min(planner.CONTEXT, m.config.sequence_len),
                                               "plan.json")
    return planner.run(args, model, source, val)


def _adapt(args) -> int:
    if (args.checkpoint is None) == (args.hf is None):
        raise ValueError("give a run directory or --hf DIR" + ("" if args.hf is None else ", not both"))
    adapt.check_output(args)
    if args.hf is not None:
        from .. import hf

        model, tokenizer = hf.load(args.hf, dtype=torch.float32)  # trained in float32 whatever it is stored in
    else:
        model, tokenizer = _load_run(args.checkpoint)
    return adapt.run(args, model, tokenizer, args.checkpoint or args.hf, CACHE)


def _validation(args, model, tokenizer):
    """The validation split of --corpus (default: the embedded plays) at --context tokens per sequence."""
    from ..training.data import load_corpus, token_stream
    from ..training.evaluate import Validation

    _, val_text = load_corpus(args.corpus).split()
    return Validation(token_stream(val_text, tokenizer, CACHE), tokenizer.token_bytes(), args.batch_size,
                      args.context or model.config.sequence_len, args.max_tokens)


def _study(args) -> int:
    import json

    from . import study

    check_out(args.out or args.checkpoint / "study", directory=True)
    runs = {args.checkpoint.name: args.checkpoint}
    if args.baseline is not None:
        if args.baseline.name == args.checkpoint.name:
            raise ValueError("--baseline and the checkpoint have the same directory name; their rows would clash")
        runs = {args.baseline.name: args.baseline, **runs}
    models, training = {}, {}
    for name, directory in runs.items():
        models[name], tokenizer = _load_run(directory)
        if (directory / "metrics.json").exists():
            training[name] = json.loads((directory / "metrics.json").read_text())
    model = models[args.checkpoint.name]
    for name, other in models.items():
        if (other.config.n_layer, other.config.vocab_size) != (model.config.n_layer, model.config.vocab_size):
            raise ValueError(f"--baseline {args.baseline} has {other.config.n_layer} layers and "
                             f"{other.config.vocab_size} tokens, {args.checkpoint} {model.config.n_layer} and "
                             f"{model.config.vocab_size}: compare runs of one shape and tokenizer")
    out = args.out or args.checkpoint / "study"
    about = {"checkpoint": str(args.checkpoint), "baseline": None if args.baseline is None else str(args.baseline)}
    baseline = None if args.baseline is None else args.baseline.name
    results = study.run(models, _validation(args, model, tokenizer), out, baseline=baseline, training=training,
                        cfg=study.StudyConfig(timing_compile=not args.eager_baseline), about=about)
    print("\n" + study.summary(results))
    print(f"wrote {out / 'report.md'}, study.json and {', '.join(results['figures'])}")
    return 0


def _generate(args) -> int:
    from ..inference.decode import generate

    def solved(a) -> bool:  # whether decoding solves anything in parallel
        return a.n_par is not None or a.speculative or a.stages is not None

    if args.out is not None:
        check_out(args.out)
    partners(args, {"strategy": (solved, "--n-par, --speculative or --stages"),
                    "iters": (solved, "--n-par, --speculative or --stages"),
                    "draft_len": (lambda a: a.speculative, "--speculative"),
                    "timeout": (lambda a: a.stages is not None, "--stages"),
                    "repeats": (lambda a: a.bench, "--stages P --bench"),
                    "out": (lambda a: a.bench, "--stages P --bench")})
    args.strategy, args.draft_len = args.strategy or "idn", args.draft_len or 4
    if args.timeout > MAX_TIMEOUT:  # a longer one overflows the process group's timedelta
        raise ValueError(f"--timeout {args.timeout}: at most {MAX_TIMEOUT} seconds (a week)")
    if args.stages is not None:
        if args.start is not None:
            raise ValueError(f"--start {args.start}: a model split across processes is solved over its stages, not "
                             f"over a segment of layers")
        return staged.run(args)
    if args.pipeline or args.bench:
        raise ValueError("--pipeline and --bench are for a model split across processes: give --stages P")
    model, tokenizer = _load_run(args.checkpoint)
    plan = _generate_plan(args, model)
    prompt = torch.tensor([tokenizer.encode(args.prompt, prepend=tokenizer.get_bos_token_id())])
    if prompt.shape[1] + args.max_new > model.rotary_len:
        raise ValueError(f"--prompt ({prompt.shape[1]} tokens) and --max-new {args.max_new} exceed the model's "
                         f"rotary cache of {model.rotary_len} tokens")
    if args.speculative:
        return _speculate(args, model, tokenizer, prompt, plan)
    out = generate(model, prompt, args.max_new, plan, args.temperature, args.top_k, args.seed)
    print(args.prompt + tokenizer.decode(out[0].tolist()))
    return 0


def _generate_plan(args, model):
    """The decoding plan of the flags: none (sequential) without --n-par, unless --speculative, whose draft
    defaults to IDN over half the layers with K = 1 (the cheapest draft; the verifier then saves half of a
    sequential pass)."""
    from ..inference import snlp

    n_par = args.n_par if args.n_par is not None or not args.speculative else max(1, model.config.n_layer // 2)
    if n_par is None:
        if args.start is not None:
            raise ValueError(f"--start {args.start} is the first block of the parallel segment: give --n-par too")
        return None
    iters = (1 if args.speculative else 2) if args.iters is None else args.iters
    plan = snlp.Plan(n_par=n_par, iters=iters, jacobian=strategy(args.strategy), start=args.start)
    _check_plan(plan, model)
    return plan


def _check_plan(plan, model, n_par_flag: str = "--n-par") -> None:
    """plan.check, its error prefixed with the flags that made the plan."""
    try:
        plan.check(model)
    except ValueError as err:
        flags = f"{n_par_flag} {plan.n_par}" + ("" if plan.start is None else f" --start {plan.start}")
        raise ValueError(f"{flags}{f' --fuse {plan.fuse}' if plan.fuse > 1 else ''}: {err}") from err


def _speculate(args, model, tokenizer, prompt, plan) -> int:
    run = compare(model, prompt, args.max_new, plan, args.draft_len, args.temperature, args.top_k, args.seed)
    stats = run.stats
    print(args.prompt + tokenizer.decode(run.tokens[0].tolist()))
    print(f"\nspeculative decoding, {plan_name(plan)} drafting B = {args.draft_len}: acceptance rate "
          f"{stats.acceptance_rate:.3f}, mean accepted length {stats.mean_accepted_length:.2f} tokens per round")
    print(f"{args.max_new / run.seconds:.1f} tokens/s against {args.max_new / run.sequential_seconds:.1f} "
          f"sequential (eager, one call each; `snlp bench --preset` times the graphed way too): speedup "
          f"{run.speedup:.2f}x")
    if args.temperature == 0:
        same = torch.equal(run.tokens, run.sequential_tokens)
        print(f"greedy: the tokens {'equal' if same else 'DIFFER FROM'} sequential greedy decoding's")
    return 0


def _bench(args) -> int:
    from . import bench

    model = args.hf or args.checkpoint
    partners(args, {"start": (lambda a: model, "a run or --hf (the presets and --train time their own plans)"),
                    "tokens": (lambda a: model, "a run or --hf (the presets set their own shapes)"),
                    "repeats": (lambda a: model or a.train, "a run, --hf or --train (the presets set their own "
                                                           "repeats)")})
    if args.hf is not None and args.checkpoint is not None:
        raise ValueError("give a run directory or --hf DIR, not both")
    args.repeats = args.repeats or 5
    check_out(args.out, directory=True)
    if args.train:
        return _bench_train(args)
    if model is not None:  # the grid of `snlp eval`, at the bench's size and repeats: PPL and top-1 beside speed
        context = [] if args.tokens is None else ["--context", str(args.tokens)]
        return _eval(_parser().commands["eval"].parse_args(
            [*(["--hf", str(args.hf)] if args.hf else [str(args.checkpoint)]), *context,
             "--max-tokens", str(4 * (args.tokens or 256)), "--batch-size", "1", "--ar-prompts", "0", "--repeats",
             str(args.repeats), "--out", str(args.out / "bench.json"),
             *(["--start", *map(str, args.start)] if args.start else []),
             *(["--eager-baseline"] if args.eager_baseline else [])]))
    device = torch.device(args.device)
    preset = args.preset or ("gpu-0.5b" if device.type == "cuda" else "cpu")
    results = suite.run(preset, device, cache_dir=CACHE)
    text = bench.table(results)
    print(text)
    write_json(args.out / "bench.json", results)
    report = f"# snlp bench --preset {preset}\n\n```\n{text}\n```\n"
    write_atomic(args.out / "bench.md", lambda f: f.write(report.encode()))
    speculative = [row for shape in results["shapes"] for row in shape.get("speculative", [])]
    if speculative:
        import analysis

        save_figure(analysis.plot_speculation(speculative, f"speculative decoding, {preset} preset"),
                    args.out / "speculation.png")
    trained = "; the trained models' tables give held-out PPL" if results.get("trained") else ""
    print(f"wrote {args.out / 'bench.json'}, bench.md{' and speculation.png' if speculative else ''} (the tables of "
          "random trained-like weights give the plans' agreement with the sequential path, not language quality"
          f"{trained})")
    return 0


def _bench_train(args) -> int:
    from . import bench
    from ..training.regularizer import Regularizer
    from ..training.config import PRESETS

    cfg = PRESETS["tiny"]
    configs = n_par_configs(cfg.model.n_layer)
    modes = {"plain": cfg}
    for mode in ("all", "sample", "batched"):
        modes[f"IDN reg, {mode}"] = dataclasses.replace(cfg, regularizer=Regularizer(ls.Identity(), configs, mode=mode),
                                                       reg_lambda=1.0)
    shape = (cfg.batch_size, cfg.model.sequence_len)
    batch = tuple(torch.randint(0, cfg.model.vocab_size, shape, device=args.device) for _ in range(2))
    results = bench.train_step_times(cfg, modes, batch, repeats=args.repeats)
    for row in results["rows"]:
        print(f"{row['mode']:<20} {row['median_s'] * 1e3:8.1f} ms/step  ({row['min_s'] * 1e3:.1f}-"
              f"{row['max_s'] * 1e3:.1f})  x{row['ratio']:.2f}")
    write_json(args.out / "train_steps.json", results)
    print(f"wrote {args.out / 'train_steps.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

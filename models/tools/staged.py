"""`snlp generate CKPT --stages P` under `torchrun --nproc-per-node P`: the model split by layers across the
processes (models.inference.ranks), decoding as a pipeline or with SNLP over stages; `--bench` times both on the
same processes and weights and prints the latency per token and SNLP's top-1 agreement with the pipeline."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from ..inference import ranks
from ..io import write_json
from . import bench
from .flags import POSITIVE
from .names import strategy


def add_flags(gen) -> None:
    """`snlp generate`'s flags for a model split across processes."""
    gen.add_argument("--stages", type=POSITIVE, metavar="P", help="split the layers across P processes (run under "
                     "`torchrun --nproc-per-node P`): SNLP over stages with --iters K (default 1), or --pipeline")
    gen.add_argument("--pipeline", action="store_true", help="--stages: each stage waits for the previous one")
    gen.add_argument("--bench", action="store_true", help="--stages: time the pipeline and the SNLP plan in turn "
                     "(greedy), print the latency per token and the top-1 agreement")
    gen.add_argument("--repeats", type=POSITIVE, default=5, help="--bench: sequences per mode")
    gen.add_argument("--timeout", type=POSITIVE, default=60, help="--stages: seconds to wait for another rank")
    gen.add_argument("--out", type=Path, help="--bench: write the measurements to this JSON file")


def run(args) -> int:
    """One rank's part of `snlp generate --stages`."""
    rank, device = ranks.init_process_group(args.stages, args.timeout)
    try:
        stage = ranks.load_stage(args.checkpoint, rank, args.stages, device=device)
        plan = ranks.StagePlan(None if args.pipeline else args.iters or 1, strategy(args.strategy))
        try:
            plan.check(args.stages)
        except ValueError as err:
            flag = "--iters" if "iters=" in str(err) else "--strategy"
            raise ValueError(f"{flag} {getattr(args, flag[2:])}: {err}") from None
        runner = ranks.StageRunner(stage, args.stages, ranks.Peers(args.timeout, device))
        if rank != 0:
            runner.serve()
            return 0
        try:
            return _bench(args, runner, plan, device) if args.bench else _generate(args, runner, plan, device)
        finally:
            runner.close()
    except ranks.StageError as err:
        print(f"snlp generate: {err}", file=sys.stderr)
        return 2
    finally:
        dist.destroy_process_group()


def _prompt(args, runner, device):
    """Rank 0's tokenizer (a Hugging Face directory's own, or the run's) and the prompt's ids (1, T)."""
    vocab = runner.stage.model.config.vocab_size
    if isinstance(runner.stage, ranks.HFStage):
        from .. import hf

        tokenizer = hf.load_tokenizer(args.checkpoint)
    else:
        from ..training.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(args.checkpoint / "tokenizer")
    if tokenizer.get_vocab_size() > vocab:
        raise ValueError(f"{args.checkpoint}: the tokenizer has {tokenizer.get_vocab_size()} tokens but the model's "
                         f"vocab_size is {vocab}")
    ids = tokenizer.encode(args.prompt, prepend=tokenizer.get_bos_token_id())
    return tokenizer, torch.tensor([ids], device=device)


def _generate(args, runner, plan, device) -> int:
    tokenizer, prompt = _prompt(args, runner, device)
    out = runner.generate(prompt, args.max_new, plan, args.temperature, args.top_k, args.seed)
    print(args.prompt + tokenizer.decode(out[0].tolist()))
    per_token = statistics.median(runner.step_seconds[1:]) if args.max_new > 1 else float("nan")
    print(f"\n{args.stages} stages, {plan.describe()}: {per_token * 1e3:.2f} ms per token", file=sys.stderr)
    return 0


def _bench(args, runner, plan, device) -> int:
    """The pipeline and the plan in turn, `repeats` greedy sequences of --max-new tokens each; the median step of
    each (the prompt step left out) is its latency per token. The plan is fed the pipeline's tokens (teacher
    forcing) for its top-1 agreement."""
    if plan.pipeline:
        raise ValueError("--bench compares the pipeline with an SNLP plan: give --iters K, not --pipeline")
    _, prompt = _prompt(args, runner, device)
    pipeline = ranks.StagePlan()
    tokens = runner.generate(prompt, args.max_new, pipeline)
    steps = {"pipeline": [], plan.describe(): []}
    agreement = []
    for _ in range(args.repeats):
        runner.generate(prompt, args.max_new, pipeline)
        steps["pipeline"] += runner.step_seconds[1:]
        logits = runner.decode(prompt, tokens, plan)
        steps[plan.describe()] += runner.step_seconds[1:]
        agreement.append((logits.argmax(dim=-1) == tokens).double().mean().item())
    latency = {name: statistics.median(seconds) for name, seconds in steps.items()}
    stage = runner.stage
    result = {"environment": bench.environment(device), "stages": args.stages, "plan": plan.describe(),
              "shape": {"n_layer": args.stages * stage.size, "n_embd": stage.state_shape(1, 1)[-1],
                        "vocab_size": stage.model.config.vocab_size, "batch": 1,
                        "prompt_tokens": prompt.shape[1], "new_tokens": args.max_new},
              "repeats": args.repeats, "latency_ms": {name: s * 1e3 for name, s in latency.items()},
              "speedup": latency["pipeline"] / latency[plan.describe()], "top1_agreement": statistics.mean(agreement)}
    for name, seconds in latency.items():
        print(f"{name:>24}: {seconds * 1e3:7.2f} ms per token")
    print(f"{'speedup':>24}: {result['speedup']:.2f}x over the pipeline, top-1 agreement "
          f"{result['top1_agreement']:.3f} ({args.stages} processes, {torch.get_num_threads()} threads each)")
    if args.out is not None:
        print(f"wrote {write_json(args.out, result)}")
    return 0

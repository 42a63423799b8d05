"""One rank of tests/test_ranks.py, started by torchrun: loads its stage of the checkpoint in float64, and on rank 0
runs each requested plan over the prompt and writes what it saw to OUT (torch.save).

    torchrun --standalone --nproc-per-node P tests/stage_worker.py CKPT OUT --fault {none,exit,hang}
"""

import argparse
import sys
import time

import torch

import layersolve as ls
from models.inference import ranks



def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("out")
    parser.add_argument("--stages", type=int, required=True)
    parser.add_argument("--prompt", type=int, default=12)
    parser.add_argument("--new", type=int, default=6)
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--fault", choices=["none", "exit", "hang"], default="none")
    args = parser.parse_args()
    rank, _ = ranks.init_process_group(args.stages, args.timeout)
    stage = ranks.load_stage(args.checkpoint, rank, args.stages, dtype=torch.float64)
    runner = ranks.StageRunner(stage, args.stages, ranks.Peers(args.timeout))
    if rank == args.stages - 1 and args.fault != "none":  # the last rank fails before its first message
        if args.fault == "hang":
            time.sleep(10 * args.timeout)
        return 0
    if rank != 0:
        runner.serve()
        torch.save({"k": runner.cache.k, "v": runner.cache.v}, f"{args.out}.rank{rank}")
        return 0
    prompt = torch.randint(0, stage.model.config.vocab_size, (1, args.prompt),
                           generator=torch.Generator().manual_seed(0))
    out = {"prompt": prompt, "materialized": sorted(n for n, p in stage.model.named_parameters() if not p.is_meta)}
    try:
        out["greedy"] = {"full": runner.generate(prompt, args.new, ranks.StagePlan(args.stages)),
                         "pipeline": runner.generate(prompt, args.new, ranks.StagePlan())}
        plans = {"full": ranks.StagePlan(args.stages), "pipeline": ranks.StagePlan(), "idn1": ranks.StagePlan(1),
                 "jacobi1": ranks.StagePlan(1, ls.Zero())}
        out["prompt_step"] = {}
        for name, plan in plans.items():  # the prompt step alone: its logits and final stage trace
            runner.generate(prompt, 1, plan)
            out["prompt_step"][name] = (runner.logits, runner.trace)
        # the last sequence: IDN K = 1 decoding, whose KV caches every rank saves
        out["idn1"] = runner.decode(prompt, out["greedy"]["full"], plans["idn1"])
        # the decoders pick inference mode whatever the caller's context (here: grad enabled)
        out["inference"] = [t.is_inference() for t in (out["greedy"]["full"], out["idn1"])]
        runner.close()
    except ranks.StageError as err:  # written, then a failed exit, on which torchrun stops the other ranks
        torch.save({**out, "error": str(err)}, args.out)
        return 3
    torch.save(out, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

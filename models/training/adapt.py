"""Adaptation (`snlp adapt`): train one segment of a trained model to be accurate under its own parallel solve, with
the original model, frozen, as the teacher. The same code adapts nanochat's models and Hugging Face models.

The student is a copy of the model whose segment [s, e) alone trains: fully, or through LoRA adapters (peft, Hugging
Face models) that are merged into its weights at the end. Its embedding, prefix blocks 0 .. s-1, suffix blocks
e .. L-1 and head stay bit-identical to the teacher's. Per batch (docs/adapt.md):

    loss = a * KL(p || q_parallel) + b * KL(p || q_sequential) + c * gap

- p: the original's sequential next-token distribution (the teacher);
- q_parallel: the student's with the segment solved by the plan (K surrogate Newton iterations, the plan's guess);
- q_sequential: the student's own sequential forward: it stays the original model, as it verifies speculative
  drafts and serves whoever runs the adapted model sequentially;
- gap: SNLP's regularizer on the segment's states: the relative gap ||h~_j - h_j|| / ||h_j|| between one surrogate
  iteration from repeat and the student's sequential trace, summed over the segment's layers j = 1 .. n-1 (j = 0
  is exact after one iteration); `regularizer.one_iteration`, as training uses it.

The teacher computes only what changed: the prefix is frozen, so h_0 .. h_s is the same for both models; it is
computed once per batch, without grad, and teacher and student both run from h_s.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..inference import snlp
from ..io import write_atomic
from ..progress import progress
from .data import TokenLoader, TokenStream
from .evaluate import kl
from .loop import Interrupted, StopRequests
from .regularizer import one_iteration, relative_gap

CHECKPOINT = "adapt_checkpoint.pt"  # the state of an adaptation in progress, in the output directory


@dataclass(frozen=True)
class AdaptConfig:
    """plan: the segment (start, n_par), the surrogate and K the adapted model is solved with. lora_rank: 0 trains
    the segment's layers fully; r > 0 trains rank-r LoRA adapters on their linear layers (peft; Hugging Face
    models), merged at the end. kl_parallel, kl_sequential, gap: the weights a, b, c of the objective. lr: AdamW's
    peak rate (default 1e-4 full, 1e-3 LoRA), after a linear warm-up over `warmup` of the steps, then a cosine
    decay to a tenth."""

    plan: snlp.Plan
    steps: int = 200
    batch_size: int = 8
    seq_len: int = 128
    lr: float | None = None
    lora_rank: int = 0
    kl_parallel: float = 1.0
    kl_sequential: float = 1.0
    gap: float = 0.1
    warmup: float = 0.05
    grad_clip: float = 1.0
    save_every: int = 50
    seed: int = 0

    def check(self, model) -> None:
        """Refuse a config this model cannot take, naming the field."""
        self.plan.check(model)
        if self.plan.fuse != 1:
            raise ValueError(f"plan.fuse={self.plan.fuse}: adaptation trains unfused segments (fuse=1)")
        if self.plan.iters is None or self.plan.iters < 1 or self.plan.tol is not None:
            raise ValueError(f"plan.iters={self.plan.iters!r}, tol={self.plan.tol!r}: adaptation trains a fixed number "
                             "of iterations K >= 1 and no tolerance")
        if self.plan.init not in ("repeat", "one_step"):
            raise ValueError(f"plan.init={self.plan.init!r}: adaptation trains from 'repeat' or 'one_step'")
        for name in ("steps", "batch_size", "seq_len", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        weights = (self.kl_parallel, self.kl_sequential, self.gap)
        if any(not math.isfinite(w) or w < 0 for w in weights) or not any(weights):
            raise ValueError(f"kl_parallel, kl_sequential, gap = {weights}: weights are >= 0, and one is > 0")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0 (0: train the layers fully), got {self.lora_rank}")
        if self.lora_rank and not hasattr(model, "lm"):
            raise ValueError("lora_rank: LoRA adapters (peft) attach to a Hugging Face model's linear layers, and "
                             "nanochat's blocks read their weights directly: adapt a nanochat run fully (rank 0)")
        if self.seq_len > model.config.sequence_len:
            raise ValueError(f"seq_len={self.seq_len} exceeds the model's context of {model.config.sequence_len}")

    def record(self) -> dict:
        """The config as JSON: the plan by its fields and the surrogate by its repr."""
        plan = asdict(self.plan) | {"jacobian": repr(self.plan.jacobian), "init": str(self.plan.init)}
        return {**{k: v for k, v in asdict(self).items() if k != "plan"}, "plan": plan}

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else (1e-3 if self.lora_rank else 1e-4)

    def lr_multiplier(self, step: int) -> float:
        warm = max(1, round(self.warmup * self.steps))
        if step < warm:
            return (step + 1) / warm
        progress_ = (step - warm) / max(1, self.steps - warm)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_))


@dataclass(frozen=True)
class Losses:
    """One batch's objective: `total` to differentiate, its parts (detached floats) for the log, and whether the
    parallel solve ended ok (a failed solve's logits are not the model's: the step is skipped)."""

    total: torch.Tensor
    kl_parallel: float
    kl_sequential: float
    gap: float
    solved: bool


def sequential_segment(segment: snlp.Segment) -> torch.Tensor:
    """The segment's blocks run one after another from the prefix's last state: its exact trace (n + 1, *state)."""
    blocks = segment.plan.segment(segment.model.config.n_layer)
    states = segment.model.trace(segment.emb, stop=blocks.stop, start=blocks.start, state=segment.prefix[-1])
    return torch.stack(states)


def losses(student, teacher, x: torch.Tensor, cfg: AdaptConfig, step: int = 0) -> Losses:
    """The objective of one batch of tokens x (B, T)."""
    plan = cfg.plan
    blocks = plan.segment(student.config.n_layer)
    with torch.no_grad():  # the frozen embedding and prefix: one computation for both models
        emb = student.embed(x)
        prefix = student.trace(emb, blocks.start)
        teacher_segment = snlp.Segment(plan, teacher, emb, prefix, system=None)
        target = teacher_segment.logits(sequential_segment(teacher_segment))
    # the segment's system is built with grad enabled: its weights carry the gradient to the trained layers
    segment = snlp.Segment(plan, student, emb, prefix, student.layer_system(emb, blocks.start, stop=blocks.stop))
    exact = sequential_segment(segment)
    parts = {}
    if cfg.kl_sequential:
        parts["kl_sequential"] = kl(target, segment.logits(exact))
    solution = segment.solve(throw=False)
    if cfg.kl_parallel:
        parts["kl_parallel"] = kl(target, segment.logits(solution.trace))
    if cfg.gap:
        approx = one_iteration(segment.system, segment.prefix[-1], plan.jacobian, step)
        parts["gap"] = sum(relative_gap(approx[j], exact[j]) for j in range(2, plan.n_par + 1))
    weights = {"kl_parallel": cfg.kl_parallel, "kl_sequential": cfg.kl_sequential, "gap": cfg.gap}
    total = sum(weights[name] * value for name, value in parts.items())
    return Losses(total, *(float(parts[name].detach()) if name in parts else math.nan for name in weights),
                  solution.result.ok)


@dataclass
class Student:
    """The model that trains, the parameters that train, and (LoRA) the peft model that merges them."""

    model: object
    params: list[torch.nn.Parameter]
    peft: object | None = None

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The trainable tensors by name: all a checkpoint needs, as the rest stays the original's."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        return {names[id(p)]: p.detach().clone() for p in self.params}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        named = dict(self.model.named_parameters())
        missing = sorted(n for n, p in named.items() if p.requires_grad and n not in state)
        if missing:
            raise ValueError(f"the checkpoint lacks trainable tensors {missing[:3]}: not this adaptation's")
        with torch.no_grad():
            for name, value in state.items():
                named[name].copy_(value)

    def merged(self):
        """The adapted model with plain weights: LoRA's products added into the weights it adapts."""
        if self.peft is None:
            return self.model
        from ..hf import HFModel

        return HFModel(self.peft.merge_and_unload(), "vmap")


def student_of(model, cfg: AdaptConfig) -> Student:
    """A copy of `model` with every parameter frozen but the segment's layers (or their LoRA adapters)."""
    student = copy.deepcopy(model).requires_grad_(False)
    blocks = cfg.plan.segment(model.config.n_layer)
    if not cfg.lora_rank:
        params = [p for i in blocks for p in student.blocks[i].parameters()]
        for p in params:
            p.requires_grad_(True)
        return Student(student, params)
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ValueError("lora_rank needs peft: pip install 'layersolve[adapt]'") from None

    from ..hf import HFModel

    inside = {id(m) for i in blocks for m in student.blocks[i].modules()}
    targets = [name for name, m in student.lm.named_modules() if id(m) in inside and isinstance(m, torch.nn.Linear)]
    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=2 * cfg.lora_rank, lora_dropout=0.0, target_modules=targets)
    torch.manual_seed(cfg.seed)  # LoRA's A matrices
    peft_model = get_peft_model(student.lm, lora)
    adapted = HFModel(peft_model.base_model.model, "loop")  # only the segment's layers carry adapters: no vmap
    return Student(adapted, [p for p in adapted.parameters() if p.requires_grad], peft_model)


def adapt(model, train: TokenStream, cfg: AdaptConfig, out_dir: str | Path, resume: bool = False,
          show_progress: bool = True) -> tuple[object, dict]:
    """Adapt `model` (frozen: the teacher) on the training stream; returns the adapted model (merged) and the
    metrics. A checkpoint of the trainable tensors, the optimizer and the data position is written to out_dir
    every `save_every` steps, at the end and on SIGINT / SIGTERM (then `Interrupted` is raised); `resume` continues
    from it."""
    cfg.check(model)
    out_dir = Path(out_dir)
    model.eval().requires_grad_(False)
    student = student_of(model, cfg)
    student.model.train()
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(student.params, lr=cfg.peak_lr, betas=(0.9, 0.95), weight_decay=0.0)
    loader = TokenLoader(train, cfg.batch_size, cfg.seq_len, device=device)
    metrics, start = {"config": cfg.record(), "train": [], "skipped_steps": 0}, 0
    if resume:
        start, metrics = _restore(out_dir, cfg, student, opt, loader)
    with StopRequests() as stop, progress(range(start, cfg.steps), initial=start, total=cfg.steps, desc="adapt",
                                          unit="step", disable=not show_progress) as bar:
        for step in bar:
            for group in opt.param_groups:
                group["lr"] = cfg.peak_lr * cfg.lr_multiplier(step)
            x, _ = next(loader)
            out = losses(student.model, model, x, cfg, step)
            if out.solved:
                out.total.backward()
                torch.nn.utils.clip_grad_norm_(student.params, cfg.grad_clip)
                opt.step()
            opt.zero_grad(set_to_none=True)
            metrics["skipped_steps"] += not out.solved
            record = {"step": step, "loss": float(out.total.detach()), "kl_parallel": out.kl_parallel,
                      "kl_sequential": out.kl_sequential, "gap": out.gap, "skipped": not out.solved}
            metrics["train"].append(record)
            bar.set_postfix(kl_par=f"{out.kl_parallel:.3g}", kl_seq=f"{out.kl_sequential:.3g}", gap=f"{out.gap:.3g}")
            done = step + 1
            stopping = stop.signum is not None and done < cfg.steps
            if done % cfg.save_every == 0 or done == cfg.steps or stopping:
                _save(out_dir, done, cfg, student, opt, loader, metrics)
            if stopping:
                raise Interrupted(done, out_dir)
    adapted = student.merged().eval().requires_grad_(False)
    return adapted, metrics


def _save(out_dir: Path, step: int, cfg: AdaptConfig, student: Student, opt, loader: TokenLoader,
          metrics: dict) -> None:
    state = {"step": step, "config": cfg.record(), "trainable": student.trainable_state(),
             "optimizer": opt.state_dict(), "loader": loader.state_dict(), "metrics": metrics}
    write_atomic(out_dir / CHECKPOINT, lambda f: torch.save(state, f))


def _restore(out_dir: Path, cfg: AdaptConfig, student: Student, opt, loader: TokenLoader) -> tuple[int, dict]:
    path = out_dir / CHECKPOINT
    if not path.exists():
        raise FileNotFoundError(f"--resume: {path} does not exist: nothing to resume")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file
        raise ValueError(f"{path}: corrupt checkpoint ({type(err).__name__})") from None
    recorded = {k: v for k, v in state["config"].items() if k not in ("steps", "save_every")}
    if recorded != {k: v for k, v in cfg.record().items() if k not in ("steps", "save_every")}:
        raise ValueError(f"{path}: made by another adaptation ({recorded}); give the same flags, or a new --out")
    if state["step"] >= cfg.steps:
        raise ValueError(f"--resume: {out_dir} is already at step {state['step']} >= --steps {cfg.steps}")
    student.load_trainable_state(state["trainable"])
    opt.load_state_dict(state["optimizer"])
    loader.load_state_dict(state["loader"])
    return state["step"], state["metrics"]

"""The distillation run: student from teacher, paper's loss, checkpoints every N steps, exact resume."""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from services.corpora import PackedData, build_data
from services.errors import TrainingConfigError
from services.family.loading import load_model, load_tokenizer
from services.family.plan import StudentLayout, layout_from_rule, layout_from_student_config
from services.family.student_init import init_student, load_student_weights, save_student
from services.store.files import write_json
from services.store.integrity import hash_weights
from services.train import fsdp
from services.train.budget import TimeBudget
from services.train.checkpoint import load_latest, save_checkpoint
from services.train.distributed import Distributed
from services.train.losses import LossWeights, distillation_loss, kl_divergence
from services.train.patching import PatchedVariants

log = logging.getLogger(__name__)
UNFITTED_STEPS = 10**9  # the provisional length of a run bounded by --max-minutes alone
STATE_FILE, LOG_FILE, ENTRY_FILE = "train_state.json", "training_log.jsonl", "manifest_entry.json"


@dataclass
class TrainConfig:
    """Every knob of `boomerang train`; defaults are the paper's where it sets one."""

    teacher: str
    data: str
    out: str
    max_steps: int | None = None
    max_tokens: int | None = None
    max_minutes: float | None = None  # fit the step count to this wall-clock budget (timed on the first steps)
    save_every: int = 50
    eval_every: int = 50
    seed: int = 0
    batch_size: int = 4
    seq_len: int = 256
    grad_accum: int = 1
    lr: float = 1e-4
    warmup_steps: int = 10
    weight_decay: float = 0.1
    clip: float = 1.0
    first: int = 1
    every: int = 2
    last: int = 2
    copied_teacher_layers: tuple[int, ...] | None = None  # an explicit layout instead of first/every/last
    random_init: bool = False
    init_student: str | None = None  # continue from an existing student's weights (same layout)
    freeze_embeddings: bool = False
    patch_order: str = "last"  # which variants --w-patch distils: "last", "first" or "2,5,3,..."
    fsdp: bool = False  # under torchrun: shard student and teacher (FSDP2) instead of DDP replicas
    weights: LossWeights = field(default_factory=LossWeights)
    resume: bool = False
    overwrite: bool = False
    device: str | None = None
    progress: bool = True

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len * self.grad_accum

    def total_steps(self, world_size: int = 1) -> int | None:
        """The step budget; None when only --max-minutes bounds the run (fitted once steps are timed)."""
        if self.max_steps is None and self.max_tokens is None:
            if self.max_minutes is not None:
                return None
            raise TrainingConfigError("give a budget: --max-steps, --max-tokens or --max-minutes")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise TrainingConfigError("--max-minutes must be positive")
        steps = self.max_steps if self.max_steps is not None else self.max_tokens // (self.tokens_per_step * world_size)
        if steps < 1:
            raise TrainingConfigError(
                f"the budget is smaller than one step ({self.tokens_per_step * world_size} tokens per step)")
        return steps


def lr_lambda(warmup: int, total: int):
    """Linear warm-up, then cosine decay to zero."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def _prepare_out_dir(config: TrainConfig, out: Path) -> dict | None:
    """The saved run state when resuming; refuses to clobber an existing run unless told."""
    state_path = out / STATE_FILE
    if config.resume and state_path.exists():
        return json.loads(state_path.read_text())
    if out.exists() and any(out.iterdir()) and not config.resume:
        if not config.overwrite:
            raise TrainingConfigError(f"{out} exists: pass --resume to continue it or --overwrite to replace it")
        shutil.rmtree(out)
    return None


# settings a resumed run must share with its start; the value is what a run saved before the key existed used
_SAME_RUN_KEYS = {"seed": None, "batch_size": None, "seq_len": None, "grad_accum": None, "first": None,
                  "every": None, "last": None, "data": None, "fsdp": False, "copied_teacher_layers": None}


def _check_same_run(saved: dict, config: TrainConfig) -> None:
    for key, missing in _SAME_RUN_KEYS.items():
        before, now = saved["config"].get(key, missing), getattr(config, key)
        if before != (list(now) if isinstance(now, tuple) else now):  # JSON keeps tuples as lists
            raise TrainingConfigError(
                f"--resume with a different {key} ({getattr(config, key)!r}) than the run ({before!r})")


def student_layout(config: TrainConfig, num_hidden_layers: int) -> StudentLayout:
    """The explicit `copied_teacher_layers` when given, else the first/every/last rule."""
    if config.copied_teacher_layers is not None:
        return layout_from_student_config({"copied_teacher_layers": config.copied_teacher_layers}, num_hidden_layers)
    return layout_from_rule(num_hidden_layers, config.first, config.every, config.last)


class Trainer:
    """Holds the models, optimizer and data of one run."""

    def __init__(self, config: TrainConfig, dist: Distributed):
        self.config, self.dist = config, dist
        self.out = Path(config.out)
        self.device = dist.device(config.device)
        torch.manual_seed(config.seed)
        self.tokenizer = load_tokenizer(config.teacher)
        teacher = load_model(config.teacher, torch.float32, self.device).requires_grad_(False)
        self.layout = student_layout(config, teacher.config.num_hidden_layers)
        self.student = init_student(teacher, self.layout, config.random_init).train().requires_grad_(True)
        if config.init_student:
            load_student_weights(self.student, Path(config.init_student), self.layout)
        if config.freeze_embeddings:
            self.student.get_input_embeddings().requires_grad_(False)
        # FSDP: rank 0 keeps a whole CPU copy to gather checkpoints into (the shards live in self.student)
        self.whole = copy.deepcopy(self.student).cpu() if dist.fsdp and dist.is_main else self.student
        self.teacher = dist.prepare_teacher(teacher)
        self.model = dist.wrap(self.student)
        self.params = [p for p in self.student.parameters() if p.requires_grad]  # after wrap: FSDP swaps them
        self.patched = None
        if config.weights.patch:
            if dist.world_size > 1:
                raise TrainingConfigError("--w-patch runs in one process only (not yet under DDP or FSDP)")
            self.patched = PatchedVariants(self.teacher, self.student, self.layout, config.patch_order, config.seed)
        cap = config.total_steps(dist.world_size)
        self.budget = None if config.max_minutes is None else TimeBudget(
            config.max_minutes * 60, config.warmup_steps, cap)
        # until a time budget is fitted: no decay yet (the fit comes at the end of the LR warm-up)
        self.total_steps = cap if cap is not None else UNFITTED_STEPS
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, betas=(0.9, 0.95),
                                           weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(config.warmup_steps, self.total_steps))
        self.data: PackedData = build_data(config.data, self.tokenizer, config.seq_len, config.seed)
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        self.step, self.tokens = 0, 0
        self.seconds_before = 0.0  # training time of earlier segments of a resumed run
        self.segment_start = time.monotonic()

    # -- state -----------------------------------------------------------------------------------------
    def restore(self) -> bool:
        checkpoint = load_latest(self.out / "checkpoints")
        if checkpoint is None:
            return False
        if self.dist.fsdp:
            if self.dist.is_main:
                checkpoint.load_weights_into(self.whole)
            fsdp.load_full_weights(self.student, self.whole.state_dict() if self.dist.is_main else {})
            fsdp.load_full_optimizer_state(self.student, self.optimizer, checkpoint.state["optimizer"])
        else:
            checkpoint.load_weights_into(self.student)
            self.optimizer.load_state_dict(checkpoint.state["optimizer"])
        self.scheduler.load_state_dict(checkpoint.state["scheduler"])
        torch.set_rng_state(checkpoint.state["rng"])
        self.step, self.tokens = checkpoint.step, checkpoint.state["tokens"]
        if self.budget is not None and checkpoint.state.get("total_steps") is not None:
            self.set_total_steps(checkpoint.state["total_steps"])  # the budget was fitted before the stop
        self.seconds_before = float(checkpoint.state.get("seconds", 0.0))
        self._truncate_log(self.step)
        log.info("resumed from step %d", self.step)
        return True

    def checkpoint(self) -> None:
        """Every rank must call (FSDP gathers); rank 0 writes."""
        optimizer_state = self._gather_optimizer_state()
        student = self._gather_student()
        if not self.dist.is_main:
            return
        state = {"optimizer": optimizer_state, "scheduler": self.scheduler.state_dict(),
                 "rng": torch.get_rng_state(), "tokens": self.tokens, "seconds": self.seconds,
                 "total_steps": self.total_steps if self.budget is None else None}  # None: not fitted yet
        save_checkpoint(self.out / "checkpoints", self.step, student, state)
        self._write_state(finished=False)

    def _gather_student(self) -> nn.Module:
        """The whole student with the current weights (under FSDP: on rank 0, gathered from the shards)."""
        if self.dist.fsdp:
            weights = fsdp.full_weights(self.student)
            if self.dist.is_main:
                self.whole.load_state_dict(weights)
        return self.whole

    def _gather_optimizer_state(self) -> dict:
        if self.dist.fsdp:
            return fsdp.full_optimizer_state(self.student, self.optimizer)
        return self.optimizer.state_dict()

    def _write_state(self, finished: bool) -> None:
        record = {"finished": finished, "step": self.step, "tokens": self.tokens, "total_steps": self.total_steps,
                  "config": {**asdict(self.config), "weights": asdict(self.config.weights)}}
        write_json(self.out / STATE_FILE, record)

    def _truncate_log(self, step: int) -> None:
        """Drops records past `step`; rank 0 only, as it alone writes the log (two ranks rewriting it at once
        could leave one's empty read behind)."""
        path = self.out / LOG_FILE
        if self.dist.is_main and path.exists():
            lines = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
            path.write_text("".join(line + "\n" for line in lines))

    def set_total_steps(self, total: int) -> None:
        """Fix the run's length (a fitted time budget): the cosine decay now ends at `total`."""
        self.total_steps, self.budget = total, None
        self.scheduler.lr_lambdas = [lr_lambda(self.config.warmup_steps, total)]
        for group, base_lr in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base_lr * self.scheduler.lr_lambdas[0](self.step)
        log.info("time budget: %d steps", total)

    # -- steps -----------------------------------------------------------------------------------------
    def micro_step(self, index: int) -> dict[str, float]:
        rows = self.data.batch(index, self.config.batch_size).to(self.device)  # [batch, seq_len+1]
        inputs, labels = rows[:, :-1], rows[:, 1:]  # [batch, seq_len] each
        mask = torch.ones_like(labels, dtype=torch.float32)  # packed rows: no padding anywhere
        with self.autocast:
            with torch.no_grad():
                teacher_out = self.teacher(inputs, output_hidden_states=True, use_cache=False)
            student_out = self.model(inputs, output_hidden_states=True, use_cache=False)
            loss, terms = distillation_loss(student_out, teacher_out, labels, mask,
                                            self.layout.aligned_hidden_states, self.config.weights)
            if self.patched is not None:
                variant_logits = self.patched.sample(index)(inputs, use_cache=False).logits  # [b, seq, vocab]
                patch = kl_divergence(variant_logits, teacher_out.logits, mask, self.config.weights.temperature)
                loss, terms = loss + self.config.weights.patch * patch, {**terms, "patch": float(patch.detach())}
        (loss / self.config.grad_accum).backward()
        return {**terms, "loss": float(loss.detach())}

    def train_step(self) -> dict[str, float]:
        sums: dict[str, float] = {}
        for micro in range(self.config.grad_accum):
            index = (self.step * self.config.grad_accum + micro) * self.dist.world_size + self.dist.rank
            for name, value in self.micro_step(index).items():
                sums[name] = sums.get(name, 0.0) + value / self.config.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += self.config.tokens_per_step * self.dist.world_size
        if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor
            grad_norm = grad_norm.full_tensor()
        return {**sums, "grad_norm": float(grad_norm)}

    @torch.no_grad()
    def validate(self) -> float | None:
        if len(self.data.valid) == 0:
            return None
        self.student.eval()
        losses = []
        for row in self.data.valid.to(self.device).split(self.config.batch_size):
            with self.autocast:
                logits = self.student(row[:, :-1], use_cache=False).logits  # [b, seq, vocab]
            losses.append(torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), row[:, 1:].flatten()))
        self.student.train()
        return float(torch.stack(losses).mean())

    def log_step(self, record: dict) -> None:
        if self.dist.is_main:
            with open(self.out / LOG_FILE, "a") as handle:
                handle.write(json.dumps(record) + "\n")

    @property
    def seconds(self) -> float:
        """Training time of the whole run, resumed segments included."""
        return self.seconds_before + time.monotonic() - self.segment_start

    def finish(self) -> dict:
        """Write the student folder, its manifest entry and the final state (main process only)."""
        seconds = self.seconds
        student = self._gather_student()
        if self.dist.is_main:
            save_student(student.eval(), self.layout, self.out, self.tokenizer)
            entry = {"student": {"path": ".", "sha256": hash_weights(self.out)},
                     "student_config": self.layout.to_student_config(),
                     "training": {"steps": self.step, "tokens": self.tokens, "seconds": round(seconds, 1),
                                  "device": str(self.device), "world_size": self.dist.world_size,
                                  "strategy": self.dist.strategy,
                                  "recipe": {**asdict(self.config.weights), "lr": self.config.lr,
                                             "freeze_embeddings": self.config.freeze_embeddings,
                                             "random_init": self.config.random_init,
                                             "init_student": self.config.init_student,
                                             "patch_order": self.config.patch_order}}}
            (self.out / ENTRY_FILE).write_text(json.dumps(entry, indent=2) + "\n")
            self._write_state(finished=True)
        return {"steps": self.step, "tokens": self.tokens, "seconds": seconds}


def run_training(config: TrainConfig) -> dict:
    """Train (or resume) a student; returns a summary. A finished run resumed does nothing."""
    out = Path(config.out)
    saved = _prepare_out_dir(config, out)
    if saved is not None:
        _check_same_run(saved, config)
        if saved["finished"]:
            log.info("run in %s is already finished (%d steps)", out, saved["step"])
            return {"steps": saved["step"], "tokens": saved["tokens"], "seconds": 0.0, "already_finished": True}
    dist = Distributed.from_env(fsdp=config.fsdp)
    try:
        out.mkdir(parents=True, exist_ok=True)
        trainer = Trainer(config, dist)
        if config.resume:
            trainer.restore()
        summary = _loop(trainer)
        dist.finish()
        return summary
    finally:
        dist.close()


def _loop(trainer: Trainer) -> dict:
    from tqdm import tqdm

    config = trainer.config
    trainer.segment_start = time.monotonic()
    known_total = trainer.total_steps if trainer.total_steps != UNFITTED_STEPS else None
    bar = tqdm(total=known_total, initial=trainer.step, unit="step", disable=not (config.progress
                                                                                            and trainer.dist.is_main))
    while trainer.step < trainer.total_steps:
        tick = time.monotonic()
        record = trainer.train_step()
        elapsed = time.monotonic() - tick
        if trainer.budget is not None:
            fitted = trainer.budget.observe(trainer.step, tick + elapsed, trainer.segment_start)
            if fitted is not None:
                trainer.set_total_steps(fitted)
                bar.total = fitted
        record = {"step": trainer.step, "tokens": trainer.tokens, **record,
                  "lr": trainer.optimizer.param_groups[0]["lr"],
                  "tokens_per_s": config.tokens_per_step * trainer.dist.world_size / elapsed}
        if config.eval_every and trainer.step % config.eval_every == 0:
            record["val_ce"] = trainer.validate()
        trainer.log_step(record)
        bar.set_postfix({k: f"{record[k]:.3g}" for k in ("loss", "ce", "kl", "cos", "mse", "patch", "tokens_per_s")
                         if k in record})
        bar.update(1)
        if trainer.step % config.save_every == 0 or trainer.step == trainer.total_steps:
            trainer.checkpoint()
    bar.close()
    summary = trainer.finish()
    summary["val_ce"] = trainer.validate()
    return summary

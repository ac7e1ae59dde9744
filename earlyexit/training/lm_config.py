"""The language-model recipe: every field a training run depends on, and its learning-rate schedule.

`configs/default_lm/base.yaml` (and the phases that name it as their `parent:`) hold the shipped recipe; `train_lm` trains
one. The schedule lives here because `budget_minutes` may lower `max_steps` mid-run (`budgeted`), and `lr_at` must
read the same fields.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from ..errors import EarlyExitError


@dataclass
class LMTrainConfig:
    """Everything a training run depends on; `configs/default_lm/base.yaml` is the shipped recipe."""

    # corpus
    sources: list[str] = field(default_factory=lambda: ["stdlib"])
    validation_fraction: float = 0.02
    test_fraction: float = 0.02
    near_dedup: bool = False  # also drop near-duplicate training and validation files (see data.read_corpus)
    # tokenizer
    vocab_size: int = 8192
    tokenizer_train_bytes: int = 60_000_000
    # backbone
    n_layer: int = 12
    n_embd: int = 256
    n_head: int = 4
    n_positions: int = 1024
    # optimisation
    seq_len: int = 256
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 200
    max_steps: int = 2000
    schedule: str = "cosine"  # cosine: warm-up then cosine to min_lr; wsd: warm-up, stable, linear decay
    decay_steps: int = 0  # wsd only: the last decay_steps steps decay linearly to min_lr
    rewarm_at: int = 0  # continuing a decayed run: warm up again from min_lr to lr starting at this step
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    bf16: bool = True
    compile: bool = False
    threads: int = 0  # 0: all cores
    device: str = "cpu"  # cpu, cuda or cuda:N: where the steps run (checkpoints and exports load on any device)
    seed: int = 0
    # start from an exported model (a directory `export` wrote, e.g. earlyexit/default_model) instead of random
    # weights: same shape and tokenizer; its step and tokens seen continue; a fresh optimizer (pair with rewarm_at)
    init_from: str = ""
    # init_from an export with fewer layers than n_layer: the extra layers are copies of evenly spaced export layers
    # whose output projections start at zero, so the grown model first computes what the export did
    # (function-preserving depth growth, `grown_layer_sources`)
    grow_layers: bool = False
    # early-exit continued pretraining (earlyexit.training.exit_loss, LayerSkip's recipe); early_exit_scale 0 and
    # layer_dropout 0 train the plain last-layer loss
    early_exit_scale: float = 0.0  # layer l's exit loss weighs early_exit_scale * (l + 1) / n_layer, the last 1
    early_exit_curriculum: str = "rotational"  # rotational: every early_exit_rotation-th layer per step; all
    early_exit_rotation: int = 3
    early_exit_positions: int = 128  # positions per window where early exits are scored (0: all)
    early_exit_kd: float = 0.0  # + early_exit_kd * KL(last layer || exit) at each scored exit
    layer_dropout: float = 0.0  # skip probability of the last block, rising linearly from 0 at the first
    # bookkeeping
    eval_interval: int = 200
    eval_windows: int = 128
    checkpoint_interval: int = 100
    max_minutes: float = 0.0  # 0: no wall-clock limit
    # wsd only, 0: off. Train as many steps as fit in this many minutes from the start, decay included: once past
    # warm-up, the run times its steps (evaluations and exports included) and lowers max_steps to what the rest of the
    # budget affords (`budgeted`); the stable learning rate does not depend on max_steps, so no step already taken
    # changes. For a machine lent for minutes, whose speed is not known beforehand.
    budget_minutes: float = 0.0
    work_dir: str = "runs/default_lm"
    out_dir: str = "runs/default_lm/export"

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise EarlyExitError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.seq_len > self.n_positions:
            raise EarlyExitError(f"seq_len ({self.seq_len}) exceeds n_positions ({self.n_positions})")
        if self.device != "cpu" and not self.device.split(":")[0] == "cuda":
            raise EarlyExitError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if self.vocab_size > 65535:
            raise EarlyExitError("vocab_size must fit uint16 token storage (< 65536)")
        for name in ("batch_size", "grad_accum", "max_steps", "n_layer"):
            if getattr(self, name) < 1:
                raise EarlyExitError(f"{name} must be at least 1")
        if self.schedule not in ("cosine", "wsd"):
            raise EarlyExitError(f"schedule must be 'cosine' or 'wsd', got {self.schedule!r}")
        if self.budget_minutes < 0 or (self.budget_minutes and self.schedule != "wsd"):
            raise EarlyExitError("budget_minutes needs schedule: wsd (a cosine schedule's every step depends on max_steps)")
        if self.schedule == "wsd" and not 0 < self.decay_steps <= self.max_steps - self.rewarm_at - self.warmup_steps:
            raise EarlyExitError("wsd needs 0 < decay_steps <= max_steps - rewarm_at - warmup_steps")
        self.objective  # validates the early-exit fields

    @property
    def decay_start(self) -> int:
        """The step where the learning rate starts to fall (wsd: end of the stable phase)."""
        if self.schedule == "wsd":
            return self.max_steps - self.decay_steps
        return self.rewarm_at + self.warmup_steps

    @property
    def objective(self):
        from .exit_loss import EarlyExitObjective

        return EarlyExitObjective(self.early_exit_scale, self.early_exit_curriculum, self.early_exit_rotation,
                                  self.early_exit_positions, self.early_exit_kd, self.layer_dropout, self.seed)

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.batch_size * self.grad_accum



def lr_at(cfg: LMTrainConfig, step: int) -> float:
    """Linear warm-up (from 0, or from min_lr when re-warming at `rewarm_at`), then cosine or
    warmup-stable-decay down to min_lr at max_steps."""
    since = step - cfg.rewarm_at
    if 0 <= since < cfg.warmup_steps:
        floor = cfg.min_lr if cfg.rewarm_at else 0.0
        return floor + (cfg.lr - floor) * (since + 1) / cfg.warmup_steps
    progress = min(1.0, max(0.0, (step - cfg.decay_start) / max(1, cfg.max_steps - cfg.decay_start)))
    if cfg.schedule == "wsd":
        return cfg.lr - (cfg.lr - cfg.min_lr) * progress
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))



BUDGET_FIRST_FIT = 50  # steps timed before budget_minutes first fits max_steps
BUDGET_MARGIN = 0.95  # of the time left, what the fit spends: a step's time varies


def budgeted(cfg: LMTrainConfig, step: int, seconds_per_step: float, seconds_left: float) -> LMTrainConfig:
    """`cfg` with max_steps lowered to the steps `seconds_left` affords at `seconds_per_step` (never past the
    configured max_steps, at least one more), and decay_steps cut to fit after `step` where those are fewer."""
    affordable = max(1, int(seconds_left / seconds_per_step))
    max_steps = min(cfg.max_steps, step + affordable)
    return dataclasses.replace(cfg, max_steps=max_steps, decay_steps=min(cfg.decay_steps, max_steps - step))


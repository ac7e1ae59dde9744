"""Train exit heads and the stop/exit/continue controller on a frozen backbone.

    python -m earlyexit.training.train_heads --model DIR --config configs/heads.yaml [key=value ...] [--resume]
    torchrun --nproc-per-node 2 -m earlyexit.training.train_heads --model DIR ...   # data-parallel, same code

Two phases over windows of the backbone's training split (never its validation or test):
1. heads: every exit head learns the next token from its layer's hidden state, with
   `loss` = ce (to the reference token), kd (KL toward the last layer's distribution,
   which is what an exit must imitate) or ce+kd (`kd_weight` mixes them);
2. controller: with the heads frozen, the shared classifier learns per token and layer
   the label *exit* (this layer's head already gives the full model's token), *stop* (the
   full model's own token is wrong) or *continue*; `labels=study` uses the study's labels
   instead (exit once any head at or before this layer is right against the reference;
   stop when no layer is).
Then thresholds are chosen on validation windows (see `choose_thresholds`) and the heads
are written beside the model (or to `out_dir`).

Distributed: under torchrun each rank takes its own windows and gradients are averaged
with all_reduce before every optimizer step (gloo on CPU, nccl on CUDA); rank 0 alone
writes checkpoints and results. The backbone is frozen, so each layer's head loss is
backpropagated separately to keep only one layer's (tokens x vocabulary) logits alive.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..config import config_parser, exit_code, load_config, to_dict
from ..data.corpus import window_batch
from ..errors import EarlyExitError
from ..runtime.heads import EXIT, STOP, ExitHeads, Thresholds, load_exit_norms
from ..runtime.model import GPT2
from .distributed import average_gradients, finish, init_distributed, run_main, world
from .layer_outputs import action_labels, layer_predictions, layer_states, previous_exit_layers, tokenize_until
from .lm_checkpoints import atomic_save


@dataclass
class HeadsTrainConfig:
    rank: int = 32
    loss: str = "ce+kd"
    kd_weight: float = 0.5
    labels: str = "agreement"
    seq_len: int = 256
    batch_size: int = 8
    head_steps: int = 400
    classifier_steps: int = 200
    lr: float = 3e-3
    classifier_lr: float = 3e-3
    warmup_steps: int = 20
    loss_positions: int = 64  # positions per window that score the head loss (all states are computed; the vocabulary projection dominates)
    train_tokens: int = 4_000_000
    eval_windows: int = 64
    target_agreement: float = 0.95
    target_stop_precision: float = 0.8
    threshold_grid: list[float] = field(default_factory=lambda: [0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999])
    bf16: bool = True
    threads: int = 0
    seed: int = 0
    checkpoint_interval: int = 100
    work_dir: str = "runs/heads"
    out_dir: str = ""  # empty: the model directory
    sources: list[str] = field(default_factory=list)  # empty: the model's own corpus (training_state.json), else stdlib
    init_from: str = ""  # a directory with heads for this backbone to start from (e.g. head_steps=0 to retrain only the controller)

    def __post_init__(self):
        if self.loss not in ("ce", "kd", "ce+kd"):
            raise EarlyExitError(f"loss must be ce, kd or ce+kd, got {self.loss!r}")
        if self.labels not in ("agreement", "study"):
            raise EarlyExitError(f"labels must be agreement or study, got {self.labels!r}")
        if not 0 <= self.kd_weight <= 1 or not 0 < self.target_agreement <= 1 or not 0 < self.target_stop_precision <= 1:
            raise EarlyExitError("kd_weight, target_agreement and target_stop_precision must lie in [0, 1]")
        if self.rank < 0 or self.seq_len < 2 or self.batch_size < 1:
            raise EarlyExitError("rank must be >= 0, seq_len >= 2 and batch_size >= 1")


# ----------------------------------------------------------------------------- data


def head_loss(heads: ExitHeads, model: GPT2, layer: int, h: torch.Tensor, target: torch.Tensor, full_logp: torch.Tensor, cfg: HeadsTrainConfig):
    """Loss of one head on N sampled positions: h (N, d), target (N,), full_logp (N, V)."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16 and h.device.type == "cpu"):
        logits = heads.head_logits(layer, h, model)
    logp = F.log_softmax(logits.float(), dim=-1)  # (N, V)
    ce = F.nll_loss(logp, target)
    kd = F.kl_div(logp, full_logp, log_target=True, reduction="batchmean")
    if cfg.loss == "ce":
        return ce
    if cfg.loss == "kd":
        return kd
    return (1 - cfg.kd_weight) * ce + cfg.kd_weight * kd



def action_logits_all(heads: ExitHeads, states: list[torch.Tensor], prev: torch.Tensor) -> torch.Tensor:
    return torch.stack([heads.action_logits(layer, h, prev) for layer, h in enumerate(states)])  # (L, B, T, 3)


# ----------------------------------------------------------------------------- thresholds

@torch.no_grad()
def controller_table(heads: ExitHeads, model: GPT2, windows: torch.Tensor, cfg: HeadsTrainConfig) -> dict:
    """Teacher-forced validation statistics: per-layer accuracy and, per threshold, what the controller would do.

    Simulated on teacher-forced hidden states: it ignores that state-copied K/V slightly
    change later tokens' states at decode time (the experiments measure real decoding).
    """
    L = model.dims.n_layer
    per_layer_right = torch.zeros(L)
    per_layer_agree = torch.zeros(L)
    probs_all, preds_all, targets_all = [], [], []
    for chunk in windows.split(cfg.batch_size):
        x, target = chunk[:, :-1], chunk[:, 1:]
        states = layer_states(model, x, cfg.bf16)
        preds = layer_predictions(heads, model, states)  # (L, B, T)
        per_layer_right += (preds == target[None]).float().sum(dim=(1, 2))
        per_layer_agree += (preds == preds[-1][None]).float().sum(dim=(1, 2))
        probs_all.append(action_logits_all(heads, states, previous_exit_layers(preds)).softmax(-1).flatten(1, 2))
        preds_all.append(preds.flatten(1))
        targets_all.append(target.flatten())
    probs = torch.cat(probs_all, dim=1)  # (L, N, 3)
    preds = torch.cat(preds_all, dim=1)  # (L, N)
    target = torch.cat(targets_all)
    n = target.numel()
    full_wrong = preds[-1] != target
    table = {"tokens": n, "per_layer_top1": (per_layer_right / n).tolist(), "per_layer_agreement": (per_layer_agree / n).tolist(),
             "full_top1": float((~full_wrong).float().mean()), "exit": [], "stop": []}
    is_max = probs.argmax(-1)  # (L, N)
    for tau in cfg.threshold_grid:
        fire = (is_max[:-1] == EXIT) & (probs[:-1, :, EXIT] > tau)  # exits before the last layer
        any_fire = fire.any(dim=0)
        first = torch.where(any_fire, fire.float().argmax(dim=0), torch.full_like(target, L - 1))
        token = preds.gather(0, first[None])[0]
        table["exit"].append({"threshold": tau, "mean_layers": float((first + 1).float().mean()),
                              "agreement": float((token == preds[-1]).float().mean()),
                              "top1": float((token == target).float().mean())})
        stop = ((is_max == STOP) & (probs[:, :, STOP] > tau)).any(dim=0)
        fired = int(stop.sum())
        table["stop"].append({"threshold": tau, "fired": fired / n,
                              "precision": float((stop & full_wrong).sum() / max(fired, 1)) if fired else None,
                              "recall": float((stop & full_wrong).sum() / max(int(full_wrong.sum()), 1))})
    return table


def wilson_lower(successes: float, n: int, z: float = 1.645) -> float:
    """One-sided 95% Wilson lower bound on a rate observed as successes / n (0 when n is 0)."""
    if n == 0:
        return 0.0
    p = successes / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - spread) / (1 + z * z / n)


def choose_thresholds(table: dict, cfg: HeadsTrainConfig) -> Thresholds:
    """Thresholds whose validation rates clear their targets with 95% confidence (a one-sided Wilson bound).

    Exit: the lowest grid threshold (the most layers saved) whose agreement with the full
    model has a lower bound >= `target_agreement`. Stop: the lowest threshold whose stop
    precision (the full model was indeed wrong where it fired) has a lower bound >=
    `target_stop_precision`, so a threshold that fired on a handful of tokens cannot qualify.
    An action with no qualifying threshold stays off (1.0).
    """
    n = table["tokens"]
    exit_ok = [r["threshold"] for r in table["exit"] if wilson_lower(r["agreement"] * n, n) >= cfg.target_agreement]
    stop_ok = [r["threshold"] for r in table["stop"]
               if r["precision"] is not None and wilson_lower(r["precision"] * r["fired"] * n, round(r["fired"] * n)) >= cfg.target_stop_precision]
    return Thresholds(exit=min(exit_ok) if exit_ok else 1.0, stop=min(stop_ok) if stop_ok else 1.0)


# ----------------------------------------------------------------------------- loop

def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def heads_to_train(model_dir: str, model: GPT2, cfg: HeadsTrainConfig) -> ExitHeads:
    """Fresh heads (their layer norms from the backbone's exit norms, when it was trained to exit), or `init_from`'s
    to continue, with their thresholds and training record cleared."""
    if cfg.init_from:
        from ..runtime.heads import load_heads

        heads = load_heads(cfg.init_from, model).float().requires_grad_(True).train()
        heads.cfg.training, heads.cfg.thresholds = {}, Thresholds()
        return heads
    return ExitHeads.for_backbone(model, rank=cfg.rank, exit_norms=load_exit_norms(model_dir, model)).float().train()


def is_head_param(name: str) -> bool:
    """The exit heads' own weights (trained first); the rest is the 3-way controller (trained after)."""
    return name.startswith(("ln.", "down", "up"))


class HeadsOptimizers:
    """The two phases' optimizers: the exit heads' weights for head_steps, then the controller's for
    classifier_steps, each with its own warm-up and decay."""

    def __init__(self, heads: ExitHeads, cfg: HeadsTrainConfig):
        self.cfg = cfg
        self.head_params = [p for n, p in heads.named_parameters() if is_head_param(n)]
        self.cls_params = [p for n, p in heads.named_parameters() if not is_head_param(n)]
        self.heads = torch.optim.AdamW(self.head_params, lr=cfg.lr, weight_decay=0.0)
        self.controller = torch.optim.AdamW(self.cls_params, lr=cfg.classifier_lr, weight_decay=0.0)

    def at(self, step: int) -> tuple[str, torch.optim.Optimizer]:
        """The phase of `step` and its optimizer, its learning rate set for the step."""
        cfg = self.cfg
        if step < cfg.head_steps:
            phase, opt, lr = "heads", self.heads, lr_at(step, cfg.head_steps, cfg.lr, cfg.warmup_steps)
        else:
            phase, opt = "controller", self.controller
            lr = lr_at(step - cfg.head_steps, cfg.classifier_steps, cfg.classifier_lr, cfg.warmup_steps)
        for g in opt.param_groups:
            g["lr"] = lr
        return phase, opt

    def state_dict(self) -> dict:
        return {"opt_heads": self.heads.state_dict(), "opt_cls": self.controller.state_dict()}

    def restore(self, heads: ExitHeads, ckpt: Path) -> int:
        """Heads and both optimizers from `ckpt`; returns the step it was written at."""
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        heads.load_state_dict(state["heads"])
        self.heads.load_state_dict(state["opt_heads"])
        self.controller.load_state_dict(state["opt_cls"])
        return state["step"]


def head_step(heads: ExitHeads, model: GPT2, states, target, step: int, cfg: HeadsTrainConfig, params) -> float:
    """One step of the exit heads: every early layer's head loss at sampled positions, against the labels and the
    last layer's distribution."""
    picks = torch.randperm(target.numel(), generator=torch.Generator().manual_seed(cfg.seed * 100_003 + step))
    picks = picks[:cfg.loss_positions * cfg.batch_size]
    with torch.no_grad():
        full_logp = F.log_softmax(model.logits(states[-1].flatten(0, 1)[picks]).float(), dim=-1)
    total_loss = 0.0
    for layer in range(model.dims.n_layer - 1):
        h = states[layer].flatten(0, 1)[picks]
        loss = head_loss(heads, model, layer, h, target.flatten()[picks], full_logp, cfg) / (model.dims.n_layer - 1)
        loss.backward()
        total_loss += loss.item()
    average_gradients(params)
    return total_loss


def controller_step(heads: ExitHeads, model: GPT2, states, target, cfg: HeadsTrainConfig, params, record: dict) -> float:
    """One step of the controller: cross-entropy to the stop/exit/continue labels the trained heads' predictions give."""
    preds = layer_predictions(heads, model, states, cfg.bf16)
    labels = action_labels(preds, target, cfg.labels)
    logits = action_logits_all(heads, states, previous_exit_layers(preds))
    loss = F.cross_entropy(logits.flatten(0, 2), labels.flatten())
    loss.backward()
    average_gradients(params)
    record["label_share"] = torch.bincount(labels.flatten(), minlength=3).div(labels.numel()).tolist()
    return loss.item()


def write_heads(heads: ExitHeads, model: GPT2, val_tokens: np.ndarray, cfg: HeadsTrainConfig, size: int, out: Path) -> None:
    """The controller's validation table, the thresholds chosen from it, and the heads saved with their record."""
    heads.eval()
    val = window_batch(val_tokens, cfg.seq_len, 0, min(cfg.eval_windows, (len(val_tokens) - 1) // cfg.seq_len), cfg.seed)
    table = controller_table(heads, model, val, cfg)
    heads.cfg.thresholds = choose_thresholds(table, cfg)
    heads.cfg.training = {"config": to_dict(cfg), "validation": table, "world_size": size,
                          "parameter_share": heads.parameter_share(model)}
    heads.save(out)
    print(f"heads: {heads.parameter_share(model):.2%} of the backbone's parameters; thresholds {asdict(heads.cfg.thresholds)}; "
          f"wrote {out}", file=sys.stderr)


def train(model_dir: str, cfg: HeadsTrainConfig, resume: bool = False) -> Path:
    """Exit heads for `model_dir`'s frozen backbone (head_steps), then the controller (classifier_steps); writes
    them beside the model (or to out_dir). Checkpointed every checkpoint_interval steps for `resume`."""
    from tqdm import tqdm

    from ..data.corpus import model_corpus
    from ..runtime.loading import load_runtime_model

    init_distributed()
    rank, size = world()
    torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // size))
    model, tok = load_runtime_model(model_dir)
    splits, _ = model_corpus(model_dir, cfg.sources or None)
    train_tokens = tokenize_until(splits["train"], tok, cfg.train_tokens, cfg.seed)
    val_tokens = tokenize_until(splits["validation"], tok, cfg.eval_windows * (cfg.seq_len + 1) * 2, cfg.seed)
    heads = heads_to_train(model_dir, model, cfg)
    work = Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / "heads_checkpoint.pt"
    total = cfg.head_steps + cfg.classifier_steps
    opts = HeadsOptimizers(heads, cfg)
    step = opts.restore(heads, ckpt) if resume and ckpt.exists() else 0
    bar = tqdm(total=total, initial=step, desc="train_heads", disable=rank != 0, dynamic_ncols=True)
    log = open(work / "log.jsonl", "a") if rank == 0 else None
    while step < total:
        t0 = time.time()
        x = window_batch(train_tokens, cfg.seq_len, (step * size + rank) * cfg.batch_size, cfg.batch_size, cfg.seed)
        states = layer_states(model, x[:, :-1], cfg.bf16)
        record = {"step": step + 1}
        phase, opt = opts.at(step)
        if phase == "heads":
            total_loss = head_step(heads, model, states, x[:, 1:], step, cfg, opts.head_params)
        else:
            total_loss = controller_step(heads, model, states, x[:, 1:], cfg, opts.cls_params, record)
        torch.nn.utils.clip_grad_norm_(heads.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        record.update(phase=phase, loss=total_loss, tok_s=x.numel() * size / (time.time() - t0))
        bar.update(1)
        bar.set_postfix(phase=phase, loss=f"{total_loss:.3f}")
        if rank == 0:
            log.write(json.dumps(record) + "\n")
            log.flush()
            if step % cfg.checkpoint_interval == 0 or step == total:
                atomic_save({"heads": heads.state_dict(), **opts.state_dict(), "step": step}, ckpt)
    bar.close()
    out = Path(cfg.out_dir or model_dir)
    if rank == 0:
        write_heads(heads, model, val_tokens, cfg, size, out)
    finish()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = config_parser(__doc__.split("\n\n")[0], HeadsTrainConfig)
    parser.add_argument("--model", help="GPT-2 checkpoint directory (default: the embedded model)")
    parser.add_argument("--resume", action="store_true", help="continue from work_dir/heads_checkpoint.pt")
    args = parser.parse_args(argv)

    def run():
        from ..runtime.loading import resolve_model_dir

        train(str(resolve_model_dir(args.model)), load_config(HeadsTrainConfig, args.config, args.overrides), resume=args.resume)

    return exit_code(run)


if __name__ == "__main__":
    run_main(main)

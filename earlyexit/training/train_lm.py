"""Train the tokenizer and a GPT-2 language model from scratch on the local code corpus.

    python -m earlyexit.training.train_lm --config configs/default_lm/base.yaml [key=value ...] [--resume]

Phases: read the corpus (`earlyexit.data.corpus`), train a byte-level BPE on the training split,
tokenize each split once into `work_dir/tokens_<split>.npy`, then train `GPT2LMHeadModel`
with AdamW, warm-up plus cosine or warmup-stable-decay (`schedule`), bf16 autocast and gradient accumulation. Every
`checkpoint_interval` steps the model, optimizer and step are written to
`work_dir/checkpoint.pt` (atomically); `--resume` continues from there with the same data
order, because the batch at step s is a pure function of (seed, s). At the end (or at
`max_minutes`) the model is exported in fp16 safetensors with its tokenizer and
`training_state.json` to `out_dir`.

The recipe and its schedule are `lm_config`, the corpus and batches `lm_data`, the model on disk (build, start
from an export, checkpoint, export) `lm_checkpoints`; this module is the loop, one named phase a function.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import config_parser, exit_code, load_config
from ..errors import EarlyExitError
from .distributed import (average_gradients, finish, from_rank0, init_distributed, mean_across_ranks, rank0_first, run_main,
                          world)
from .lm_checkpoints import build_model, export, init_from_export, save_checkpoint
from .lm_config import BUDGET_FIRST_FIT, BUDGET_MARGIN, LMTrainConfig, budgeted, lr_at
from .lm_data import batch_at, prepare_data

__all__ = ["LMTrainConfig", "batch_at", "budgeted", "build_model", "evaluate", "init_from_export", "lr_at", "main",
           "prepare_data", "train"]


@torch.no_grad()
def evaluate(model, tokens: np.ndarray, cfg: LMTrainConfig, norms=None) -> dict:
    """Mean next-token loss and top-1 accuracy on evenly spaced validation windows; with exit norms (early-exit
    training), also each layer's top-1 through its exit and how often it agrees with the last layer."""
    from .exit_loss import layer_top1

    model.eval()
    n_windows = (len(tokens) - 1) // cfg.seq_len
    picks = np.linspace(0, n_windows - 1, num=min(cfg.eval_windows, n_windows)).astype(int)
    loss_sum, correct, count = 0.0, 0, 0
    right = agrees = 0
    for chunk in np.array_split(picks, max(1, len(picks) // cfg.batch_size)):
        x = torch.from_numpy(np.stack([np.asarray(tokens[i * cfg.seq_len:i * cfg.seq_len + cfg.seq_len + 1], dtype=np.int64) for i in chunk]))
        x = x.to(cfg.device)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            logits = model(x[:, :-1]).logits.float()
            if norms is not None:
                r, a = layer_top1(model, norms, x)
                right, agrees = right + r, agrees + a
        loss_sum += torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum").item()
        correct += (logits.argmax(-1) == x[:, 1:]).sum().item()
        count += x[:, 1:].numel()
    model.train()
    out = {"val_loss": loss_sum / count, "val_top1": correct / count}
    if norms is not None:
        out["val_top1_by_layer"] = [round(v / count, 5) for v in right.tolist()]
        out["val_agree_by_layer"] = [round(v / count, 5) for v in agrees.tolist()]
    return out



@dataclass
class Run:
    """What the loop carries from step to step: the model (with its exit norms when it trains to exit), the
    optimizer, and where the run stands."""

    model: torch.nn.Module
    norms: torch.nn.Module | None
    optimizer: torch.optim.Optimizer
    params: list[torch.nn.Parameter]  # in the optimizer's order: what the ranks average
    step: int = 0
    tokens_seen: int = 0


def start_run(cfg: LMTrainConfig, tok, device: torch.device, resume: bool, resume_from: str | None) -> Run:
    """The model, exit norms and optimizer at the step this run starts from: fresh, an export (`init_from`), this
    work_dir's checkpoint (`resume`) or another run's (`resume_from`)."""
    work = Path(cfg.work_dir)
    model = build_model(cfg, tok)
    step, tokens_seen = 0, 0
    if cfg.init_from and not (resume and (work / "checkpoint.pt").exists()) and not resume_from:
        step, tokens_seen = init_from_export(model, tok, Path(cfg.init_from), cfg.grow_layers)
        print(f"initialised from {cfg.init_from} (step {step}, {tokens_seen:,} tokens seen)", file=sys.stderr)
    norms = None
    if cfg.objective.scale:
        from .exit_loss import ExitNorms

        norms = ExitNorms(model.transformer.ln_f, cfg.n_layer).to(device)
    model.to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2] + (list(norms.parameters()) if norms else [])
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95), fused=True,
    )
    run = Run(model, norms, optimizer, decay + no_decay, step, tokens_seen)
    start_path = Path(resume_from) if resume_from else work / "checkpoint.pt"
    if resume_from and not start_path.is_file():
        raise EarlyExitError(f"--resume-from: no checkpoint at {start_path}")
    if (resume or resume_from) and start_path.exists():
        restore(run, start_path)
    return run


def restore(run: Run, path: Path) -> None:
    """Model, exit norms, optimizer moments, step and tokens seen from a checkpoint `save_checkpoint` wrote."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    run.model.load_state_dict(state["model"])
    if run.norms is not None:
        if "exit_norms" not in state:
            raise EarlyExitError(f"{path} was not trained with early exits: start this recipe from its export (init_from)")
        run.norms.load_state_dict(state["exit_norms"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.step, run.tokens_seen = state["step"], state["tokens_seen"]
    print(f"resumed at step {run.step} ({run.tokens_seen:,} tokens seen)", file=sys.stderr)


def train_step(run: Run, cfg: LMTrainConfig, tokens: np.ndarray, device: torch.device, forward, rank: int, size: int):
    """One optimizer step over grad_accum micro-batches of every rank; returns the mean loss and, when training
    to exit, the cross-entropy of each layer scored this step."""
    for g in run.optimizer.param_groups:
        g["lr"] = lr_at(cfg, run.step)
    loss_total, per_layer = 0.0, {}
    for micro in range(cfg.grad_accum):
        x = batch_at(tokens, cfg, run.step, micro, rank, size).to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            loss, per_layer = forward(x, run.step * cfg.grad_accum + micro)
        loss = loss / cfg.grad_accum
        loss.backward()
        loss_total += loss.item()
    average_gradients(run.params)
    loss_total = mean_across_ranks(loss_total)
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    run.tokens_seen += cfg.tokens_per_step * size
    return loss_total, per_layer


def loss_function(run: Run, cfg: LMTrainConfig):
    """(x, micro-step) -> (loss, per-layer cross-entropy): the early-exit objective, or the last layer's loss alone."""
    objective = cfg.objective
    if objective.active:
        from .exit_loss import block_forward, objective_loss

        block_fn = torch.compile(block_forward) if cfg.compile else block_forward
        return lambda x, micro: objective_loss(run.model, run.norms, x, objective, micro, block_fn)
    step_fn = torch.compile(run.model) if cfg.compile else run.model

    def last_layer(x, micro):
        logits = step_fn(x[:, :-1]).logits
        return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten()), {}

    return last_layer


class Budget:
    """`budget_minutes`: steps are timed from past warm-up and compilation; max_steps is fitted after
    BUDGET_FIRST_FIT of them, and again at each evaluation until the decay starts, as evaluations join the timing.
    The budget counts from the loop's start: corpus preparation and model loading are not in it."""

    def __init__(self, cfg: LMTrainConfig, step: int):
        self.t_start = time.time()
        self.timed_from = max(step, cfg.rewarm_at) + cfg.warmup_steps if cfg.budget_minutes else None
        self.timer: tuple[int, float] | None = None
        self.eval_seconds = 0.0  # the last evaluation, checkpoint and export: the run's last step pays one too

    def fit(self, cfg: LMTrainConfig, step: int, bar) -> LMTrainConfig:
        if step == self.timed_from:
            self.timer = (step, time.time())
        elif self.timer and step < cfg.decay_start and (step == self.timer[0] + BUDGET_FIRST_FIT or step % cfg.eval_interval == 0):
            per_step = (time.time() - self.timer[1]) / (step - self.timer[0])  # evaluations and exports since timed_from
            left = cfg.budget_minutes * 60 - (time.time() - self.t_start) - self.eval_seconds
            cfg = budgeted(cfg, step, per_step, BUDGET_MARGIN * left)
            bar.write(f"budget_minutes={cfg.budget_minutes}: {per_step:.3f} s/step at step {step}, so max_steps "
                      f"{cfg.max_steps} (decay over the last {cfg.decay_steps})")
            bar.total = cfg.max_steps
        return cfg


def keep(run: Run, cfg: LMTrainConfig, tok, meta: dict, last_eval: dict, out_of_time: bool) -> bool:
    """Rank 0's checkpoints and exports after a step (the end of the stable phase keeps its own checkpoint: a longer
    run later continues from there with --resume-from); True when it exported."""
    work, step = Path(cfg.work_dir), run.step
    if step % cfg.checkpoint_interval == 0 or step == cfg.max_steps or out_of_time:
        save_checkpoint(work / "checkpoint.pt", run.model, run.optimizer, step, run.tokens_seen, run.norms)
    if cfg.schedule == "wsd" and step == cfg.decay_start:
        save_checkpoint(work / "checkpoint_stable.pt", run.model, run.optimizer, step, run.tokens_seen, run.norms)
    exports = step % cfg.eval_interval == 0 or step == cfg.max_steps or out_of_time
    if exports:
        export(run.model, tok, cfg, step, run.tokens_seen, meta, last_eval, run.norms)
    return bool(exports)


def step_record(run: Run, cfg: LMTrainConfig, loss: float, per_layer: dict, seconds: float, size: int, bar) -> dict:
    """The log line of a step, and the progress bar's loss per layer group."""
    tps = cfg.tokens_per_step * size / seconds
    record = {"step": run.step, "tokens_seen": run.tokens_seen, "loss": loss, "tok_s": tps, "time": time.time()}
    groups = {}
    if cfg.objective.active:
        record["ce_by_layer"] = {str(layer): round(v, 4) for layer, v in sorted(per_layer.items())}
        groups = layer_groups(per_layer, cfg.n_layer)
    bar.set_postfix(loss=f"{loss:.3f}", **groups, tok_s=f"{tps:,.0f}", lr=f"{lr_at(cfg, run.step - 1):.2e}")
    return record


def evaluate_now(run: Run, cfg: LMTrainConfig, validation: np.ndarray, bar) -> dict:
    last_eval = evaluate(run.model, validation, cfg, run.norms)
    by_layer = last_eval.get("val_top1_by_layer")
    bar.write(f"step {run.step}: val_loss {last_eval['val_loss']:.3f} val_top1 {last_eval['val_top1']:.3f}"
              + (f" top1 by layer {' '.join(f'{v:.3f}' for v in by_layer)}" if by_layer else ""))
    return last_eval


def train(cfg: LMTrainConfig, resume: bool = False, resume_from: str | None = None) -> None:
    from tqdm import tqdm

    init_distributed()
    rank, size = world()
    torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // size))
    Path(cfg.work_dir).mkdir(parents=True, exist_ok=True)
    with rank0_first():  # rank 0 reads and tokenizes the corpus; the others then load its caches
        tok, tokens, meta = prepare_data(cfg)
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EarlyExitError(f"device={cfg.device} but torch sees no CUDA device on this machine")
    run = start_run(cfg, tok, device, resume, resume_from)
    if run.step >= cfg.max_steps:  # a finished run: export it again (what `export` writes may have changed since)
        if rank == 0:
            last_eval = evaluate(run.model, tokens["validation"], cfg, run.norms)
            export(run.model, tok, cfg, run.step, run.tokens_seen, meta, last_eval, run.norms)
            print(f"already at max_steps ({cfg.max_steps}): re-exported to {cfg.out_dir}", file=sys.stderr)
        finish()
        return
    forward = loss_function(run, cfg)
    run.model.train()
    log = open(Path(cfg.work_dir) / "log.jsonl", "a") if rank == 0 else None
    budget, last_eval = Budget(cfg, run.step), {}
    bar = tqdm(total=cfg.max_steps, initial=run.step, desc="train_lm", dynamic_ncols=True, disable=rank != 0)
    while run.step < cfg.max_steps:
        t0 = time.time()
        loss, per_layer = train_step(run, cfg, tokens["train"], device, forward, rank, size)
        step_seconds = time.time() - t0
        bar.update(1)
        record = step_record(run, cfg, loss, per_layer, step_seconds, size, bar)
        if rank == 0 and (run.step % cfg.eval_interval == 0 or run.step == cfg.max_steps):
            last_eval = evaluate_now(run, cfg, tokens["validation"], bar)
            record.update(last_eval)
        out_of_time = cfg.max_minutes and (time.time() - budget.t_start) / 60 >= cfg.max_minutes
        if rank == 0:  # rank 0 alone logs, checkpoints, exports and fits the budget; the ranks agree on what it decides
            log.write(json.dumps(record) + "\n")
            log.flush()
            if keep(run, cfg, tok, meta, last_eval, out_of_time):
                budget.eval_seconds = time.time() - t0 - step_seconds  # this step's evaluation, checkpoint and export
            cfg = budget.fit(cfg, run.step, bar)
        cfg, out_of_time = agreed(cfg, out_of_time)
        if out_of_time:
            if rank == 0:
                bar.write(f"stopping at step {run.step}: max_minutes={cfg.max_minutes} reached (resume with --resume)")
            break
    bar.close()
    finish()


def agreed(cfg: LMTrainConfig, out_of_time) -> tuple[LMTrainConfig, bool]:
    """Rank 0's max_steps, decay_steps and whether to stop now, on every rank (one small broadcast per step)."""
    max_steps, decay_steps, stop = from_rank0([cfg.max_steps, cfg.decay_steps, int(bool(out_of_time))])
    if (max_steps, decay_steps) != (cfg.max_steps, cfg.decay_steps):
        cfg = dataclasses.replace(cfg, max_steps=max_steps, decay_steps=decay_steps)
    return cfg, bool(stop)


def layer_groups(per_layer: dict[int, float], n_layer: int) -> dict[str, str]:
    """Mean cross-entropy of the scored layers in the first, middle and last third of the network (progress bar)."""
    groups: dict[str, list[float]] = {}
    for layer, v in per_layer.items():
        name = "ce_last" if layer == n_layer - 1 else ("ce_low", "ce_mid", "ce_high")[min(2, 3 * layer // n_layer)]
        groups.setdefault(name, []).append(v)
    return {k: f"{sum(v) / len(v):.2f}" for k, v in sorted(groups.items())}


def main(argv: list[str] | None = None) -> int:
    parser = config_parser(__doc__.split("\n\n")[0], LMTrainConfig)
    parser.add_argument("--resume", action="store_true", help="continue from work_dir/checkpoint.pt")
    parser.add_argument("--resume-from", metavar="CKPT", help="continue from this checkpoint (e.g. work_dir/checkpoint_stable.pt)")
    parser.add_argument("--prepare-only", action="store_true",
                        help="read the corpus, train or inherit the tokenizer and tokenize into work_dir, then stop "
                             "(what earlyexit.data.pack packs for another machine)")
    args = parser.parse_args(argv)

    def run():
        cfg = load_config(LMTrainConfig, args.config, args.overrides)
        if args.prepare_only:
            _, tokens, _ = prepare_data(cfg)
            print(f"prepared {cfg.work_dir}: " + ", ".join(f"{s} {len(t):,} tokens" for s, t in tokens.items()))
        else:
            train(cfg, resume=args.resume, resume_from=args.resume_from)

    return exit_code(run)


if __name__ == "__main__":
    run_main(main)

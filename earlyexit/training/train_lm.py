"""Train the tokenizer and a GPT-2 language model from scratch on the local code corpus.

    python -m earlyexit.training.train_lm --config configs/default_lm.yaml [key=value ...] [--resume]

Phases: read the corpus (`earlyexit.data.corpus`), train a byte-level BPE on the training split,
tokenize each split once into `work_dir/tokens_<split>.npy`, then train `GPT2LMHeadModel`
with AdamW, warm-up plus cosine or warmup-stable-decay (`schedule`), bf16 autocast and gradient accumulation. Every
`checkpoint_interval` steps the model, optimizer and step are written to
`work_dir/checkpoint.pt` (atomically); `--resume` continues from there with the same data
order, because the batch at step s is a pure function of (seed, s). At the end (or at
`max_minutes`) the model is exported in fp16 safetensors with its tokenizer and
`training_state.json` to `out_dir`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..config import config_parser, exit_code, load_config, to_dict
from ..errors import EarlyExitError
from ..data.corpus import SPLITS
from ..runtime.heads import EXIT_NORMS
from .distributed import (average_gradients, finish, from_rank0, init_distributed, mean_across_ranks, rank0_first, run_main,
                          world)


@dataclass
class LMTrainConfig:
    """Everything a training run depends on; `configs/default_lm.yaml` is the shipped recipe."""

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


# ----------------------------------------------------------------------------- data

def prepare_data(cfg: LMTrainConfig):
    """Tokenizer and tokenized splits, built once and cached in work_dir."""
    from transformers import AutoTokenizer

    from ..data.corpus import read_configured_corpus
    from ..data.tokenizer import train_tokenizer

    work = Path(cfg.work_dir)
    tok_dir = work / "tokenizer"
    meta_path = work / "corpus.json"
    if not (tok_dir / "tokenizer.json").exists() or not meta_path.exists():
        print(f"reading corpus {cfg.sources} ...", file=sys.stderr)
        splits, stats = read_configured_corpus(cfg)
        print(f"corpus: {stats}", file=sys.stderr)
        if cfg.init_from and not (tok_dir / "tokenizer.json").exists():
            # the weights to start from fix the tokenizer: a new one trained on this corpus could never match them
            tok = inherited_tokenizer(Path(cfg.init_from), tok_dir, cfg.vocab_size)
        else:
            tok = train_tokenizer([r["text"] for r in splits["train"]], cfg.vocab_size, tok_dir, cfg.tokenizer_train_bytes, cfg.seed)
        for split, rows in splits.items():
            encode_split(tok, rows, work, split)
        meta = {"stats": dataclasses.asdict(stats), "tokens": {s: int(np.load(work / f"tokens_{s}.npy", mmap_mode="r").shape[0]) for s in splits}}
        meta_path.write_text(json.dumps(meta, indent=2))
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    meta = json.loads(meta_path.read_text())
    if not all((work / f"tokens_{s}.npy").exists() for s in SPLITS):
        print("token caches missing: re-encoding the corpus with the existing tokenizer ...", file=sys.stderr)
        splits, stats = read_configured_corpus(cfg)
        for split in ("train", "validation"):  # the test split may have changed (near-duplicate filtering); these may not
            listed = work / f"files_{split}.txt"
            if listed.exists() and listed.read_text() != "".join(r["path"] + "\n" for r in splits[split]):
                raise EarlyExitError(f"the {split} files on this machine differ from those {work} was trained on ({listed}): start a new work_dir")
        for split, rows in splits.items():
            encode_split(tok, rows, work, split)
    tokens = {s: np.load(work / f"tokens_{s}.npy", mmap_mode="r") for s in SPLITS}
    return tok, tokens, meta




def inherited_tokenizer(export_dir: Path, tok_dir: Path, vocab_size: int):
    """The tokenizer of the export an `init_from` run starts from, saved into this run's tok_dir."""
    from ..runtime.loading import load_tokenizer

    tok = load_tokenizer(export_dir)
    if len(tok) != vocab_size:
        raise EarlyExitError(f"init_from: {export_dir}'s tokenizer has {len(tok)} tokens, the recipe's vocab_size is {vocab_size}")
    tok.save_pretrained(str(tok_dir))
    return tok


def encode_split(tok, rows: list[dict], work: Path, split: str) -> None:
    """One split as a flat EOS-joined uint16 token stream, plus its file list."""
    encoded = tok([r["text"] for r in rows], add_special_tokens=False)["input_ids"] if rows else []
    flat = np.fromiter((t for ids in encoded for t in (*ids, tok.eos_token_id)), dtype=np.uint16)
    np.save(work / f"tokens_{split}.npy", flat)
    (work / f"files_{split}.txt").write_text("".join(r["path"] + "\n" for r in rows))


def batch_at(tokens: np.ndarray, cfg: LMTrainConfig, step: int, micro: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """The micro-batch for (step, micro) of this rank: windows of seq_len+1 in a seeded per-epoch order. A step's
    world * grad_accum micro-batches are consecutive windows, so two ranks of batch b see what one process of
    batch 2b sees."""
    from ..data.corpus import window_batch

    first = ((step * cfg.grad_accum + micro) * world + rank) * cfg.batch_size
    return window_batch(tokens, cfg.seq_len, first, cfg.batch_size, cfg.seed)


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


# ----------------------------------------------------------------------------- model

def build_model(cfg: LMTrainConfig, tok):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=len(tok), n_positions=cfg.n_positions, n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head,
        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    torch.manual_seed(cfg.seed)
    return GPT2LMHeadModel(config)


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


def grown_layer_sources(old: int, new: int) -> list[int]:
    """For each layer of a model grown from `old` to `new` layers, the export layer it starts from: each once, in
    order, and the new layers (a repeat of the layer before) spread evenly. 12 -> 16: 0 0 1 2 3 3 4 5 6 6 7 8 9 9 10 11."""
    return [j * old // new for j in range(new)]


def init_from_export(model, tok, path: Path, grow_layers: bool = False) -> tuple[int, int]:
    """Load an exported model's weights into `model` (built from this recipe); returns its (step, tokens seen).

    Position embeddings past the export's context (it keeps `seq_len` rows) stay as initialised. With
    `grow_layers`, a model of more layers than the export starts as the export: see `grown_layer_sources`; each new
    layer's attention and MLP output projections are zero, so it adds nothing to the residual stream until trained.
    """
    import re

    from ..runtime.loading import load_hf_model, load_tokenizer

    if load_tokenizer(path).get_vocab() != tok.get_vocab():
        raise EarlyExitError(f"init_from: {path} has a different tokenizer from {tok.name_or_path}")
    exported = load_hf_model(path)
    source = exported.state_dict()
    old, new = exported.config.n_layer, model.config.n_layer
    if old != new and not (grow_layers and old < new):
        raise EarlyExitError(f"init_from: {path} has {old} layers, the recipe builds {new}"
                             + ("" if old > new else " (grow_layers=true starts the deeper model from it)"))
    sources = grown_layer_sources(old, new)
    target = model.state_dict()
    for name, value in target.items():
        layer = re.match(r"transformer\.h\.(\d+)\.(.*)", name)
        fresh = False
        if layer:
            j = int(layer[1])
            fresh = j > 0 and sources[j] == sources[j - 1]
            name = f"transformer.h.{sources[j]}.{layer[2]}"
        if name not in source:
            raise EarlyExitError(f"init_from: {path} has no tensor {name}: not a model of this recipe's shape")
        got = source[name]
        if name.endswith("wpe.weight") and got.shape[1:] == value.shape[1:] and got.shape[0] <= value.shape[0]:
            value[:got.shape[0]] = got
        elif got.shape != value.shape:
            raise EarlyExitError(f"init_from: {name} is {tuple(got.shape)} in {path}, the recipe builds {tuple(value.shape)}")
        elif fresh and ".c_proj." in name:
            value.zero_()
        else:
            value.copy_(got)
    state_path = path / "training_state.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    return int(state.get("step", 0)), int(state.get("tokens_seen", 0))


BUDGET_FIRST_FIT = 50  # steps timed before budget_minutes first fits max_steps
BUDGET_MARGIN = 0.95  # of the time left, what the fit spends: a step's time varies


def budgeted(cfg: LMTrainConfig, step: int, seconds_per_step: float, seconds_left: float) -> LMTrainConfig:
    """`cfg` with max_steps lowered to the steps `seconds_left` affords at `seconds_per_step` (never past the
    configured max_steps, at least one more), and decay_steps cut to fit after `step` where those are fewer."""
    affordable = max(1, int(seconds_left / seconds_per_step))
    max_steps = min(cfg.max_steps, step + affordable)
    return dataclasses.replace(cfg, max_steps=max_steps, decay_steps=min(cfg.decay_steps, max_steps - step))


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(path: Path, model, optimizer, step: int, tokens_seen: int, norms=None) -> None:
    tmp = path.with_suffix(".tmp")
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "tokens_seen": tokens_seen}
    if norms is not None:
        state["exit_norms"] = norms.state_dict()
    torch.save(state, tmp)
    os.replace(tmp, path)



def read_curve(log_path: Path) -> list[dict]:
    """The evaluation points of a training log (step, tokens seen, validation loss and top-1), each tagged with
    the log's work_dir: validation is that run's corpus's split, so points of different work_dirs do not compare."""
    if not log_path.exists():
        return []
    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    keep = ("step", "tokens_seen", "val_loss", "val_top1", "tok_s")
    return [{**{k: r[k] for k in keep if k in r}, "work_dir": str(log_path.parent)} for r in rows if "val_loss" in r]


def training_curve(cfg: LMTrainConfig) -> list[dict]:
    """This run's evaluation points, after those of the export it started from (`init_from`), if any.

    A point of both (the export lies in this work_dir, or its run's log survived) is kept once, as the log has it,
    so re-exporting over `init_from` never duplicates the inherited curve.
    """
    inherited = []
    if cfg.init_from and (Path(cfg.init_from) / "training_state.json").is_file():
        before = json.loads((Path(cfg.init_from) / "training_state.json").read_text())
        where = before.get("config", {}).get("work_dir", cfg.init_from)
        inherited = [{"work_dir": where, **r} for r in before.get("curve", []) if r["step"] <= cfg.rewarm_at]
    logged = read_curve(Path(cfg.work_dir) / "log.jsonl")
    in_log = {(r["work_dir"], r["step"]) for r in logged}
    merged = [r for r in inherited if (r["work_dir"], r["step"]) not in in_log] + logged
    return sorted(merged, key=lambda r: r["step"])


def trained_context_model(state: dict, tok, cfg: LMTrainConfig):
    """A `GPT2LMHeadModel` of the recipe's shape holding `state`, its context cut to the `seq_len` positions it trained."""
    model = build_model(dataclasses.replace(cfg, n_positions=cfg.seq_len), tok)
    model.load_state_dict({k: v[:cfg.seq_len] if k.endswith("wpe.weight") else v for k, v in state.items()})
    return model


def export(model, tok, cfg: LMTrainConfig, step: int, tokens_seen: int, meta: dict, last_eval: dict, norms=None) -> None:
    """fp16 safetensors + tokenizer + training_state.json: what ships as the default model.

    The exported context is `seq_len`, not `n_positions`: position embeddings past the
    training windows never received a gradient (weight decay only shrinks them), and a
    prompt reaching into them makes the model degenerate. Cropping them turns such a prompt
    into the runtime's clear "longer than the context" error or its left-truncation.
    """
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    trained_context_model(model.state_dict(), tok, cfg).to(torch.float16).save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    if norms is not None:  # what train_heads starts the exit heads' layer norms from
        from safetensors.torch import save_file

        save_file({k: v.detach().to(torch.float32).contiguous() for k, v in norms.state_dict().items()}, str(out / EXIT_NORMS))
    state = {
        "step": step, "tokens_seen": tokens_seen, "config": to_dict(cfg), "corpus": meta, "last_eval": last_eval,
        "curve": training_curve(cfg),
    }
    (out / "training_state.json").write_text(json.dumps(state, indent=2))


# ----------------------------------------------------------------------------- loop

def train(cfg: LMTrainConfig, resume: bool = False, resume_from: str | None = None) -> None:
    from tqdm import tqdm

    init_distributed()
    rank, size = world()
    torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // size))
    work = Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    with rank0_first():  # rank 0 reads and tokenizes the corpus; the others then load its caches
        tok, tokens, meta = prepare_data(cfg)
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EarlyExitError(f"device={cfg.device} but torch sees no CUDA device on this machine")
    model = build_model(cfg, tok)
    step, tokens_seen = 0, 0
    if cfg.init_from and not (resume and (work / "checkpoint.pt").exists()) and not resume_from:
        step, tokens_seen = init_from_export(model, tok, Path(cfg.init_from), cfg.grow_layers)
        print(f"initialised from {cfg.init_from} (step {step}, {tokens_seen:,} tokens seen)", file=sys.stderr)
    objective = cfg.objective
    norms = None
    if objective.scale:
        from .exit_loss import ExitNorms

        norms = ExitNorms(model.transformer.ln_f, cfg.n_layer).to(device)
    model.to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2] + (list(norms.parameters()) if norms else [])
    optimizer_params = decay + no_decay
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95), fused=True,
    )
    ckpt_path = work / "checkpoint.pt"
    start_path = Path(resume_from) if resume_from else ckpt_path
    if resume_from and not start_path.is_file():
        raise EarlyExitError(f"--resume-from: no checkpoint at {start_path}")
    if (resume or resume_from) and start_path.exists():
        state = torch.load(start_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        if norms is not None:
            if "exit_norms" not in state:
                raise EarlyExitError(f"{start_path} was not trained with early exits: start this recipe from its export (init_from)")
            norms.load_state_dict(state["exit_norms"])
        optimizer.load_state_dict(state["optimizer"])
        step, tokens_seen = state["step"], state["tokens_seen"]
        print(f"resumed at step {step} ({tokens_seen:,} tokens seen)", file=sys.stderr)
    if step >= cfg.max_steps:  # a finished run: export it again (what `export` writes may have changed since)
        if rank == 0:
            export(model, tok, cfg, step, tokens_seen, meta, evaluate(model, tokens["validation"], cfg, norms), norms)
            print(f"already at max_steps ({cfg.max_steps}): re-exported to {cfg.out_dir}", file=sys.stderr)
        finish()
        return
    step_fn = torch.compile(model) if cfg.compile else model
    if objective.active:
        from .exit_loss import block_forward, objective_loss

        block_fn = torch.compile(block_forward) if cfg.compile else block_forward
    model.train()
    log = open(work / "log.jsonl", "a") if rank == 0 else None
    t_start = time.time()
    last_eval: dict = {}
    bar = tqdm(total=cfg.max_steps, initial=step, desc="train_lm", dynamic_ncols=True, disable=rank != 0)
    # budget_minutes: steps are timed from `timed_from` (past warm-up and compilation); max_steps is fitted after
    # BUDGET_FIRST_FIT of them, and again at each evaluation until the decay starts, as evaluations join the timing
    # (the budget counts from here: corpus preparation and model loading are not in it)
    timed_from = max(step, cfg.rewarm_at) + cfg.warmup_steps if cfg.budget_minutes else None
    timer: tuple[int, float] | None = None
    eval_seconds = 0.0
    while step < cfg.max_steps:
        t0 = time.time()
        for g in optimizer.param_groups:
            g["lr"] = lr_at(cfg, step)
        loss_total = 0.0
        for micro in range(cfg.grad_accum):
            x = batch_at(tokens["train"], cfg, step, micro, rank, size).to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                if objective.active:
                    loss, per_layer = objective_loss(model, norms, x, objective, step * cfg.grad_accum + micro, block_fn)
                else:
                    logits = step_fn(x[:, :-1]).logits
                    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
            loss = loss / cfg.grad_accum
            loss.backward()
            loss_total += loss.item()
        average_gradients(optimizer_params)
        loss_total = mean_across_ranks(loss_total)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += cfg.tokens_per_step * size
        step_seconds = time.time() - t0
        tps = cfg.tokens_per_step * size / step_seconds
        bar.update(1)
        record = {"step": step, "tokens_seen": tokens_seen, "loss": loss_total, "tok_s": tps, "time": time.time()}
        groups = {}
        if objective.active:
            record["ce_by_layer"] = {str(layer): round(v, 4) for layer, v in sorted(per_layer.items())}
            groups = layer_groups(per_layer, cfg.n_layer)
        bar.set_postfix(loss=f"{loss_total:.3f}", **groups, tok_s=f"{tps:,.0f}", lr=f"{lr_at(cfg, step - 1):.2e}")
        if rank == 0 and (step % cfg.eval_interval == 0 or step == cfg.max_steps):
            last_eval = evaluate(model, tokens["validation"], cfg, norms)
            record.update(last_eval)
            by_layer = last_eval.get("val_top1_by_layer")
            bar.write(f"step {step}: val_loss {last_eval['val_loss']:.3f} val_top1 {last_eval['val_top1']:.3f}"
                      + (f" top1 by layer {' '.join(f'{v:.3f}' for v in by_layer)}" if by_layer else ""))
        out_of_time = cfg.max_minutes and (time.time() - t_start) / 60 >= cfg.max_minutes
        if rank > 0:  # rank 0 alone logs, checkpoints, exports and fits the budget; the ranks agree on what it decides
            cfg, out_of_time = agreed(cfg, out_of_time)
            if out_of_time:
                break
            continue
        log.write(json.dumps(record) + "\n")
        log.flush()
        if step % cfg.checkpoint_interval == 0 or step == cfg.max_steps or out_of_time:
            save_checkpoint(ckpt_path, model, optimizer, step, tokens_seen, norms)
        if cfg.schedule == "wsd" and step == cfg.decay_start:
            # the end of the stable phase: a longer run later continues from here (--resume-from)
            save_checkpoint(work / "checkpoint_stable.pt", model, optimizer, step, tokens_seen, norms)
        if step % cfg.eval_interval == 0 or step == cfg.max_steps or out_of_time:
            export(model, tok, cfg, step, tokens_seen, meta, last_eval, norms)
            eval_seconds = time.time() - t0 - step_seconds  # this step's evaluation, checkpoint and export
        if step == timed_from:
            timer = (step, time.time())
        elif timer and step < cfg.decay_start and (step == timer[0] + BUDGET_FIRST_FIT or step % cfg.eval_interval == 0):
            per_step = (time.time() - timer[1]) / (step - timer[0])  # evaluations and exports since timed_from included
            left = cfg.budget_minutes * 60 - (time.time() - t_start) - eval_seconds  # the last step's evaluation too
            fitted = budgeted(cfg, step, per_step, BUDGET_MARGIN * left)
            bar.write(f"budget_minutes={cfg.budget_minutes}: {per_step:.3f} s/step at step {step}, so max_steps "
                      f"{fitted.max_steps} (decay over the last {fitted.decay_steps})")
            cfg = fitted
            bar.total = cfg.max_steps
        cfg, out_of_time = agreed(cfg, out_of_time)
        if out_of_time:
            bar.write(f"stopping at step {step}: max_minutes={cfg.max_minutes} reached (resume with --resume)")
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

"""Calibrate the exit threshold: early-exit tokens agree with the full model's at a target rate, with a stated confidence.

    python -m earlyexit.training.calibrate [--model DIR] [--config configs/calibrate.yaml] [--target-agreement 0.99] [key=value ...]

Learn-Then-Test (Angelopoulos et al., 2021) with fixed-sequence testing. On validation
prompts (files the backbone never trained on, cut at a random token), the early-exit
policy (stopping off) completes each prompt at every threshold of the grid; then one
full-depth pass over prompt + completion gives the full model's own next token at every
written position, so each token after the first (the first comes from the full-depth
prefill) either agrees with the full model given the same prefix or does not. That is
real decoding, state-copied K/V included, not a teacher-forced simulation.

For each threshold t the null hypothesis "disagreement rate >= 1 - target" gets the
binomial tail p-value P(Binomial(n, 1 - target) <= disagreements). Thresholds are tested
from the most conservative down, and testing stops at the first that is not rejected at
level delta; the lowest rejected one is chosen (1.0, exits off, when none is). This controls
the chance of certifying a threshold whose true disagreement exceeds 1 - target at delta,
treating tokens as independent trials (tokens of one completion are not quite: the
measured table is kept so a reader can judge).

The chosen exit threshold and the whole table are written into the heads' config
(`exit_heads.json`), so the CLI, the benchmark and the experiments use it by default;
`python -m earlyexit.generate --target-agreement X` re-runs the test for another target
from the stored table.
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass, field

import torch

from ..config import config_parser, exit_code, load_config
from ..errors import EarlyExitError


@dataclass
class CalibrateConfig:
    target_agreement: float = 0.99
    delta: float = 0.05  # the chance of certifying a threshold that misses the target
    grid: list[float] = field(default_factory=lambda: [0.999, 0.99, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5])
    prompts: int = 100
    max_new_tokens: int = 32
    max_prompt_tokens: int = 256
    threads: int = 0  # 0: all cores
    seed: int = 0
    write: bool = True  # write the chosen threshold and the table into the heads' config

    def __post_init__(self):
        for name in ("target_agreement", "delta"):
            value = getattr(self, name)
            if not 0.0 < value < 1.0:
                raise EarlyExitError(f"{name} must be in (0, 1), got {value!r}")
        if not self.grid or any(not 0.0 <= t <= 1.0 for t in self.grid):
            raise EarlyExitError(f"grid thresholds must be in [0, 1], got {self.grid}")
        if self.prompts < 1 or self.max_new_tokens < 2:
            raise EarlyExitError("prompts must be >= 1 and max_new_tokens >= 2")


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) <= k), summed in log space (exact for the n of a calibration set)."""
    if k >= n:
        return 1.0
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * math.log(p) + (n - i) * math.log1p(-p)
            for i in range(k + 1)]
    top = max(logs)
    return min(1.0, math.exp(top) * sum(math.exp(v - top) for v in logs))


def choose_threshold(table: list[dict], target: float, delta: float) -> tuple[float, list[dict]]:
    """Fixed-sequence test from the highest threshold down: the lowest certified threshold (1.0 if none) and the tests."""
    if not 0.0 < target < 1.0 or not 0.0 < delta < 1.0:
        raise EarlyExitError(f"target agreement and delta must be in (0, 1), got {target!r} and {delta!r}")
    chosen, tests = 1.0, []
    for row in sorted(table, key=lambda r: -r["threshold"]):
        p = binomial_tail(row["disagreements"], row["tokens"], 1.0 - target) if row["tokens"] else 1.0
        tests.append({"threshold": row["threshold"], "p_value": p, "certified": p <= delta})
        if p > delta:
            break
        chosen = row["threshold"]
    return chosen, tests


@torch.inference_mode()
def agreement_row(model, heads, tok, prompts: list[list[int]], threshold: float, max_new_tokens: int) -> dict:
    """Decode every prompt with early exit at `threshold` (stop off); count tokens that disagree with the full model."""
    from ..runtime.batch import complete_batch
    from ..runtime.decoding import GenerationSettings
    from ..runtime.heads import Thresholds
    from ..runtime.policies import EarlyExit

    policy = EarlyExit(model, heads, Thresholds(exit=threshold, stop=1.0), exit_rule="controller")  # its threshold is calibrated
    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    tokens = disagreements = layers = 0
    completions = []
    for i in range(0, len(prompts), 16):  # batched: equal to decoding each prompt alone, row for row
        completions += complete_batch(model, tok, prompts[i:i + 16], settings, policy=policy)
    for ids, c in zip(prompts, completions):
        written = c.token_ids
        if len(written) < 2:
            continue
        seq = torch.tensor([ids + written[:-1]], device=model.device)
        full_next = model(seq, model.new_cache(1, seq.shape[1]), 0)[0].argmax(-1)[len(ids):]  # full's token after each prefix
        ours = torch.tensor(written[1:], device=model.device)
        tokens += len(written) - 1
        disagreements += int((full_next != ours).sum())
        layers += sum(c.exit_layers[1:])
    return {"threshold": threshold, "tokens": tokens, "disagreements": disagreements,
            "agreement": 1 - disagreements / tokens if tokens else None, "mean_layers": layers / tokens if tokens else None}


def calibrate(model_dir: str | None, cfg: CalibrateConfig) -> dict:
    import os

    from tqdm import tqdm

    from ..data.corpus import model_corpus, token_cut_examples
    from ..runtime.heads import load_heads
    from ..runtime.loading import load_runtime_model, resolve_model_dir

    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    directory = resolve_model_dir(model_dir)
    model, tok = load_runtime_model(directory)
    heads = load_heads(directory, model)
    files = model_corpus(directory)[0]["validation"]
    max_prompt = min(cfg.max_prompt_tokens, model.dims.n_positions - cfg.max_new_tokens)  # prompt + completion fit the context
    examples = token_cut_examples(files, tok, cfg.prompts, target_tokens=cfg.max_new_tokens, max_prompt_tokens=max_prompt, seed=cfg.seed)
    prompts = [tok.encode(ex.prompt)[-max_prompt:] for ex in examples]
    table = [agreement_row(model, heads, tok, prompts, t, cfg.max_new_tokens) for t in tqdm(sorted(set(cfg.grid), reverse=True), desc="thresholds")]
    chosen, tests = choose_threshold(table, cfg.target_agreement, cfg.delta)
    calibration = {"target_agreement": cfg.target_agreement, "delta": cfg.delta, "chosen_exit": chosen, "table": table, "tests": tests,
                   "prompts": len(prompts), "max_new_tokens": cfg.max_new_tokens, "split": "validation", "config": asdict(cfg)}
    if cfg.write:
        heads.cfg.thresholds.exit = chosen
        heads.cfg.calibration = calibration
        heads.save_config(directory)
    return calibration


def report(cal: dict) -> str:
    lines = [f"threshold  tokens  agreement  mean layers  p-value (H0: agreement < {cal['target_agreement']})"]
    p_values = {t["threshold"]: t["p_value"] for t in cal["tests"]}
    for row in cal["table"]:
        p = p_values.get(row["threshold"])
        agreement = "-" if row["agreement"] is None else f"{row['agreement']:.2%}"
        layers = "-" if row["mean_layers"] is None else f"{row['mean_layers']:.2f}"
        lines.append(f"{row['threshold']:>9g}  {row['tokens']:>6}  {agreement:>9}  {layers:>11}  "
                     + ("not tested (an earlier threshold failed)" if p is None else f"{p:.3g}{'  certified' if p <= cal['delta'] else ''}"))
    lines.append(f"chosen exit threshold: {cal['chosen_exit']:g} (agreement >= {cal['target_agreement']:.1%} with confidence {1 - cal['delta']:.0%})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = config_parser(__doc__.split("\n\n")[0], CalibrateConfig)
    parser.add_argument("--model", help="GPT-2 checkpoint directory with exit heads (default: the embedded model)")
    parser.add_argument("--target-agreement", type=float, help="share of tokens that must equal the full model's (overrides the config)")

    def run():
        cfg = load_config(CalibrateConfig, args.config, args.overrides)
        if args.target_agreement is not None:
            cfg = CalibrateConfig(**{**asdict(cfg), "target_agreement": args.target_agreement})
        print(report(calibrate(args.model, cfg)))

    args = parser.parse_args(argv)
    return exit_code(run)


if __name__ == "__main__":
    sys.exit(main())

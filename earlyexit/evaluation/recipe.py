"""The training recipe that led to a model, rebuilt from the `configs/default_lm/*.yaml` phases and written out in words."""

from __future__ import annotations

import re
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "default_lm"  # the recipe's phases, in a source checkout


def recipe_phases(tc: dict, config_dir: Path = CONFIG_DIR) -> list[tuple[str, dict]]:
    """The training phases that led to this model, oldest first: (config path, config). Each
    continued phase re-warms at `rewarm_at` = the previous phase's `max_steps`: a resumed phase
    continues a config training into the same work_dir, an `init_from` phase the config whose
    export (`out_dir`) it started from. The chain is rebuilt from the `config_dir/*.yaml` files (each read with its
    `parent:` chain: a phase's file holds only what differs from the phase it names)."""
    from ..config import read_yaml

    configs = []
    for path in sorted(config_dir.glob("*.yaml")):
        cfg = read_yaml(path)  # a phase's whole config, its parent chain resolved
        if isinstance(cfg, dict) and "work_dir" in cfg and "max_steps" in cfg:
            configs.append((f"configs/{config_dir.name}/{path.name}", cfg))  # the path a user types at the repo root

    def before(c: dict) -> tuple[str, dict] | None:
        if c.get("init_from"):
            return next(((p, x) for p, x in configs if x.get("out_dir") == c["init_from"] and x["max_steps"] == c["rewarm_at"]), None)
        return next(((p, x) for p, x in configs if x["work_dir"] == c["work_dir"] and x["max_steps"] == c["rewarm_at"]), None)

    last = next(((p, c) for p, c in configs if c["work_dir"] == tc.get("work_dir") and c["max_steps"] == tc.get("max_steps")
                 and c.get("rewarm_at", 0) == tc.get("rewarm_at", 0)), None)
    chain = [last] if last else []
    while chain and chain[0][1].get("rewarm_at"):
        previous = before(chain[0][1])
        if previous is None:
            return []
        chain.insert(0, previous)
    return chain


def schedule_lines(tc: dict, config_dir: Path = CONFIG_DIR) -> list[str]:
    """The learning-rate schedule in words, phase by phase for a continued (re-warmed) run."""
    phases = recipe_phases(tc, config_dir)
    if not phases:
        return [f"- Peak LR {tc['lr']:g} after {tc['warmup_steps']} warm-up steps, {tc.get('schedule', 'cosine')} to {tc['min_lr']:g}, "
                f"{tc['max_steps']:,} steps."]
    from ..training.train_lm import LMTrainConfig

    defaults, lines = LMTrainConfig(), []
    for i, (path, c) in enumerate(phases, 1):
        previous_dir = phases[i - 2][1]["work_dir"] if i > 1 else None
        start = c.get("rewarm_at", 0)
        warm = (f"re-warm at step {start:,} from {c['min_lr']:g} to {c['lr']:g}" if start
                else f"warm-up to {c['lr']:g}") + f" over {c['warmup_steps']} steps"
        shape = (f"stable, then linear decay over the last {c['decay_steps']:,} steps" if c.get("schedule") == "wsd" else "cosine")
        window = f"{c.get('batch_size', defaults.batch_size)} × {c.get('seq_len', defaults.seq_len)}-token windows"
        if not c.get("init_from"):
            origin = ""
        elif c["work_dir"] == previous_dir:
            origin = (f"starts from `{c['init_from']}`, the previous phase's export in the same work_dir (fresh optimizer; "
                      "where that phase's checkpoint is present, `--resume` continues it instead); ")
        else:
            moved = "on its own corpus in" if c.get("sources") != phases[i - 2][1].get("sources") else "in its own work_dir"
            origin = f"starts from `{c['init_from']}` (the previous phase's export; fresh optimizer) {moved} `{c['work_dir']}`; "
        if c.get("init_from") and c.get("grow_layers"):
            origin += (f"grown from {phases[i - 2][1].get('n_layer', defaults.n_layer)} to {c['n_layer']} layers (`grow_layers`: "
                       "the new ones start as copies of evenly spaced layers with zeroed output projections); ")
        named = re.search(r"phase(\d+)", path)  # phases that did not lead here (phase 11) leave gaps in the chain's count
        lines.append(f"- Phase {named[1] if named else i} (`{path}`{', `--resume`' if start else ''}): {origin}{window}; "
                     f"{warm}, {shape} to {c['min_lr']:g} at step {c['max_steps']:,}.")
    lines.append("- Reproduce: " + ", then ".join(f"`python -m earlyexit.training.train_lm --config {p}{' --resume' if c.get('rewarm_at') else ''}`"
                                                   for p, c in phases) + ".")
    return lines

"""Which loss should train the exit heads? Cross-entropy to the reference, distillation toward the last layer, or both.

    python experiments/head_loss_ablation.py [--model DIR] [--steps 80] [key=value ...]

Trains the heads (no controller) once per loss with everything else equal (configs/heads.yaml
unless --config), then reports on validation windows, per layer: top-1 against the
reference and agreement with the full model (what an exit must achieve to change nothing).
Writes experiments/results/head_loss_ablation/.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import stamp, write_results  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="GPT-2 checkpoint directory (default: the embedded model)")
    p.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs/heads.yaml"))
    p.add_argument("--steps", type=int, default=80, help="head training steps per loss")
    p.add_argument("--losses", default="ce,kd,ce+kd")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    from earlyexit.config import load_config
    from earlyexit.runtime.heads import load_heads
    from earlyexit.runtime.loading import load_runtime_model, resolve_model_dir
    from earlyexit.training.train_heads import HeadsTrainConfig, train

    model_dir = resolve_model_dir(args.model)
    model, _ = load_runtime_model(model_dir)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for loss in args.losses.split(","):
            out = Path(tmp) / loss.replace("+", "_")
            cfg = load_config(HeadsTrainConfig, args.config, [*args.overrides, f"loss={loss}", f"head_steps={args.steps}",
                                                              "classifier_steps=1", f"work_dir={out}/work", f"out_dir={out}"])
            train(str(model_dir), cfg)
            table = load_heads(out, model).cfg.training["validation"]
            rows.append({"loss": loss, "per_layer_top1": table["per_layer_top1"], "per_layer_agreement": table["per_layer_agreement"],
                         "tokens": table["tokens"]})
    L = model.dims.n_layer
    header = "| loss | " + " | ".join(f"L{i + 1}" for i in range(L - 1)) + " | mean |"
    lines = [f"Exit heads trained {args.steps} steps per loss; validation, teacher-forced. Layer {L} is the full model "
             f"(top-1 {rows[0]['per_layer_top1'][-1]:.1%}).", "", "Agreement with the full model's token:", "", header,
             "|---" * (L + 1) + "|"]
    for r in rows:
        a = r["per_layer_agreement"][:-1]
        lines.append(f"| {r['loss']} | " + " | ".join(f"{x:.1%}" for x in a) + f" | {sum(a) / len(a):.1%} |")
    lines += ["", "Top-1 against the reference token:", "", header, "|---" * (L + 1) + "|"]
    for r in rows:
        t = r["per_layer_top1"][:-1]
        lines.append(f"| {r['loss']} | " + " | ".join(f"{x:.1%}" for x in t) + f" | {sum(t) / len(t):.1%} |")
    out = write_results("head_loss_ablation", {"stamp": stamp(str(model_dir), vars(args)), "rows": rows}, "\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env bash
# After a new backbone ships in earlyexit/default_model: retrain its exit heads, recalibrate the exit
# threshold, rescore the quality curve, rewrite the model card and rerun every experiment, so nothing
# committed describes an older model. About an hour on two cores; run it on a quiet machine (the timings are part of the results).
set -euo pipefail
cd "$(dirname "$0")/.."
run() { echo "+ $*" >&2; "$@"; }
run python -m earlyexit.training.train_heads --config configs/heads.yaml
run python -m earlyexit.training.calibrate --config configs/calibrate.yaml
# the n-gram cache's weight, on validation lines: where its best weight moved, set earlyexit.runtime.ngram_cache.DEFAULT_WEIGHT
# to it (a test fails until they agree) before the card, which scores the CLI's default
run python experiments/ngram_cache_sweep.py --config configs/ngram_cache_sweep.yaml
# the quality curve scores the recipe's phase checkpoints where they are on this machine (where the model trained)
# and keeps the committed rows of the others; it runs before the card, which quotes it
run python experiments/quality_curve.py --config configs/quality_curve.yaml
run python -m earlyexit.evaluation.model_card --model earlyexit/default_model --config configs/model_card.yaml
run python experiments/per_layer_study.py --config configs/per_layer_study.yaml
run python experiments/threshold_sweep.py --config configs/threshold_sweep.yaml
run python experiments/stop_analysis.py --config configs/stop_analysis.yaml
run python experiments/member_completion.py --config configs/member_completion.yaml
run python experiments/benchmark_generate.py
run python experiments/benchmark_generate.py --no-peers --no-memory --prompts 10 --repeats 2 --draft-layers 3 6 8 9 10 11 --out draft_layers
run python experiments/decode_profile.py
run python experiments/head_loss_ablation.py
run python experiments/summarize.py

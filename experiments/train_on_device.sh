#!/usr/bin/env bash
# Train configs/default_lm/gpu.yaml on a lent GPU machine within one device call, from a corpus packed here.
#
# Here, with the pins that read the shipped model's corpus (its card lists them; file-list hash d16e07dc), prepare that
# corpus with the shipped tokenizer (phase 12's recipe inherits it from phase 10's export) and pack it:
#   mkdir -p runs/default_lm_wide && cp -r earlyexit/default_model runs/default_lm_wide/export
#   python -m earlyexit.training.train_lm --config configs/default_lm/phase12.yaml --prepare-only
#   python -m earlyexit.data.pack pack runs/default_lm_deep runs/carry/corpus.tar.xz     # 24.6 MiB, 1.7 min here
# One device call, carrying it (the repository is ~26 MiB of the 64 MiB that travel):
#   run(command="bash experiments/train_on_device.sh runs/carry/corpus.tar.xz 6.5", carry=["runs/carry"], timeout_s=580)
# It unpacks the corpus (checked against its manifest), trains for MINUTES (compilation and the decay included), and
# leaves train.log and the export, as tar parts under the device tool's 16 MiB a file, in $OUT. Back here:
#   mkdir -p runs/default_lm_gpu && cat FILES_AT/export.tar.part* | tar x -C runs/default_lm_gpu
# then score it (experiments/quality_curve.py) before shipping it as any phase (see experiments/README.md).
# Extra key=value arguments override the recipe (the tests run it on the CPU with a tiny model).
set -euo pipefail
cd "$(dirname "$0")/.."
pack=${1:?usage: train_on_device.sh PACK.tar.xz [MINUTES] [key=value ...]}
minutes=${2:-6.5}
shift $(( $# < 2 ? $# : 2 ))
out=${OUT:?OUT: the folder whose files come back}
work=${WORK_DIR:-runs/default_lm_gpu}
python=${PYTHON:-python3}  # the device's python3 holds PyTorch
"$python" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
"$python" -m earlyexit.data.pack unpack "$pack" "$work"
# the progress bar's redraws stay out of the log; evaluations and the budget's decision stay in
PYTHONUNBUFFERED=1 "$python" -m earlyexit.training.train_lm --config configs/default_lm/gpu.yaml budget_minutes="$minutes" \
    work_dir="$work" out_dir="$work/export" "$@" 2>&1 | tr '\r' '\n' | sed '/^train_lm: /d' | tee "$out/train.log"
tar cf - -C "$work" export log.jsonl | split -b 15m -d - "$out/export.tar.part"
ls -l "$out"

"""Training: the language model (`train_lm`: the loop; `lm_config`, `lm_data`, `lm_checkpoints`: its recipe, data and
files; the early-exit objective in `exit_loss`), the exit heads and controller on a frozen backbone (`train_heads`,
reading the layers through `layer_outputs`) and the exit threshold's calibration (`calibrate`). Builds on the data
stage and the runtime; never imports evaluation, export or the front ends."""

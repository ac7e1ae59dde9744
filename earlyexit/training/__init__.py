"""Training: the language model (`train_lm`, with the early-exit objective of `exit_loss`), the exit heads and
controller on a frozen backbone (`train_heads`) and the exit threshold's calibration (`calibrate`). Builds on the data
stage and the runtime; never imports evaluation, export or the front ends."""

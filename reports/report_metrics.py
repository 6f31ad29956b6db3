"""Metric names the report and the hparams view show (names from harness eval.json)."""

HPARAM_METRICS = (
    "i2t_r1",
    "t2i_r1",
    "mean_r1",
    "i2t_r5",
    "t2i_r5",
    "zeroshot_mean_top1",
    "linprobe_mean_top1",
)

"""What a user runs: pretrain, linprobe, finetune, evaluate, sweep, quickstart (each ``python -m mae_ray <job>``
or ``mae-ray <job>``), with the driver-side steps they share (driver, eval_driver) and where an encoder comes
from (encoders).
"""

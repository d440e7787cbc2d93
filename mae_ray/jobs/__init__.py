"""What a user runs: pretrain, linprobe, finetune, evaluate, sweep, quickstart (each ``python -m mae_ray <job>``
or ``mae-ray <job>``), with the one run lifecycle they all go through (lifecycle; eval_job: the evaluation
jobs' part of it) and where an encoder comes from (encoders).
"""

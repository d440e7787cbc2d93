"""How code reaches Ray: the Ray session and resource checks, the trainer launch and checkpoint storage
(launch, driver side), the checkpoint format (checkpoints), the epoch loop every Ray Train worker runs
(worker_loop), the Ray processes a sweep driver leaves (ray_processes), injected faults for tests.
"""

"""How code reaches Ray: the Ray session and resource checks, the trainer launch and checkpoint storage
(launch, driver side), the epoch loop every Ray Train worker runs (worker_loop), injected faults for tests.
"""

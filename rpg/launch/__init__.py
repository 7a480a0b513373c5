"""Whoever starts processes: the ranks of one run (ranks), SLURM/local submission and the jobs' wrapper
(submit), sweeps as data (sweep) and the size/memory estimate of a run (plan)."""

"""One rank's RL loop: building the run (build), collecting batches (rollouts), the RL step (learner, update,
reference), held-out evaluation (evaluation, evaluate) and the loop itself (loop.run). Nothing here starts a
process: rpg.launch does."""

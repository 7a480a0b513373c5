"""Data-parallel rollouts: with several ranks, each rank samples its share of the prompts with its own
engine (its GPU's vLLM, or its own model copy for HF generate) and every rank gets all the samples.

The split is contiguous (rank 0 the first prompts) and the gathered rows come back in prompt order, so
the result has the layout of one engine generating everything; every rank must call ``generate`` with
the same prompts (they do: the prompt sampler is replicated).
"""

from __future__ import annotations

from rpg.rollout.base import Generations, SamplingParams, concat_generations


class ShardedEngine:
    def __init__(self, engine, backend):
        self.engine, self.backend = engine, backend

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingParams) -> Generations:
        mine = self.backend.local_share(prompt_token_ids)
        first = self.backend.local_share(list(range(len(prompt_token_ids))))[:1]
        # engines that seed by row (vLLM) are told where this share starts, so ranks never share a seed
        extra = {"first_row": first[0]} if first and getattr(self.engine, "seeds_by_row", False) else {}
        parts = self.backend.all_gather_object(self.engine.generate(mine, sampling, **extra) if mine else None)
        return concat_generations([g for g in parts if g is not None])

    def sync_weights(self, weights) -> None:
        self.engine.sync_weights(weights)

    def sleep(self) -> None:
        self.engine.sleep()

    def close(self) -> None:
        self.engine.close()

"""Rollout engines: HF generate (CPU, any device) and vLLM (GPU; rpg/rollout/vllm.py is its only importer)."""

from rpg.rollout.base import Generations, RolloutEngine, SamplingParams


def make_engine(kind: str, model, tokenizer, **options) -> RolloutEngine:
    if kind == "hf":
        from rpg.rollout.hf import HFEngine

        return HFEngine(model, tokenizer)
    if kind == "vllm":
        from rpg.rollout.vllm import VLLMEngine  # optional extra: pip install -e .[gpu]

        return VLLMEngine(model, tokenizer, **options)
    raise ValueError(f"unknown rollout engine {kind!r}; use hf or vllm (engine.rollout)")


__all__ = ["Generations", "RolloutEngine", "SamplingParams", "make_engine"]

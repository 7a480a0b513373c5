"""Rollout engines: HF generate (any device), a lean sampler for small models (CPU) and vLLM (GPU;
rpg/rollout/vllm.py is its only importer)."""

from rpg.rollout.base import Generations, RolloutEngine, SamplingParams


def make_engine(kind: str, model, tokenizer, **options) -> RolloutEngine:
    if kind == "hf":
        from rpg.rollout.hf import HFEngine

        return HFEngine(model, tokenizer)
    if kind == "lean":
        from rpg.rollout.lean import LeanEngine

        return LeanEngine(model, tokenizer)
    if kind == "vllm":
        from rpg.rollout.vllm import VLLMEngine  # optional extra: pip install -e .[gpu]

        return VLLMEngine(model, tokenizer, **options)
    raise ValueError(f"unknown rollout engine {kind!r}; use hf, lean or vllm (engine.rollout)")


__all__ = ["Generations", "RolloutEngine", "SamplingParams", "make_engine"]

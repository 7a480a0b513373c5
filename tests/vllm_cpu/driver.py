"""Runs inside .venv-vllm (CPU vLLM): drives a VLLMEngine through the phases that test_vllm_cpu.py checks.

Usage: .venv-vllm/bin/python tests/vllm_cpu/driver.py SPEC.json OUT.pt
SPEC: {"model_a": dir, "model_b": dir, "model_c": dir, "prompts": [str], "long_prompt": str, "temperature": float,
       "n": int, "max_new_tokens": int, "kv_cache_bytes": int}  (dirs written by rpg.models.tiny.save_tiny)
OUT: {phase: generations as a dict of tensors/texts, "timing": {...}}. No assertions here: the test
(main venv, no vllm) compares everything with the HF model.
"""

from __future__ import annotations

import json
import sys
import time


def as_dict(g) -> dict:
    return {"prompt_ids": g.prompt_ids, "prompt_mask": g.prompt_mask, "response_ids": g.response_ids,
            "response_mask": g.response_mask, "truncated": g.truncated, "sampler_logp": g.sampler_logp,
            "texts": list(g.texts)}


def main(spec_path: str, out_path: str) -> None:
    t_start = time.perf_counter()
    import torch

    from rpg.models.tiny import load_tiny
    from rpg.rollout.base import SamplingParams
    from rpg.rollout.vllm import VLLMEngine

    spec = json.loads(open(spec_path).read())
    model_a, tok = load_tiny(spec["model_a"])
    model_b, _ = load_tiny(spec["model_b"])
    model_c, _ = load_tiny(spec["model_c"])
    prompts = [tok.encode(p) for p in spec["prompts"]]
    long = [tok.encode(spec["long_prompt"])]
    sample = SamplingParams(n=spec["n"], temperature=spec["temperature"], max_new_tokens=spec["max_new_tokens"])
    greedy = SamplingParams(n=2, temperature=0.0, max_new_tokens=spec["max_new_tokens"])
    out, timing = {}, {"imports_s": time.perf_counter() - t_start}

    t0 = time.perf_counter()
    # sync_chunk_bytes=1: every layer (and embed/norm tensor) goes in its own message
    engine = VLLMEngine(model_a, tok, kv_cache_memory_bytes=spec["kv_cache_bytes"], seed=0, sync_chunk_bytes=1)
    timing["engine_start_s"] = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()
        out["gen_a"] = as_dict(engine.generate(prompts, sample))
        timing["generate_a_s"] = time.perf_counter() - t0
        out["greedy_a"] = as_dict(engine.generate(prompts, greedy))
        for name, seed, rows in (("seeded_1", 7, prompts), ("seeded_2", 7, prompts[:2]), ("seeded_3", 8, prompts)):
            engine.generate(long, sample)  # whatever the engine sampled before must not matter
            torch.manual_seed(seed)  # torch's stream seeds each request
            out[name] = as_dict(engine.generate(rows, sample))
        torch.manual_seed(7)
        out["seeded_share"] = as_dict(engine.generate(prompts[1:2], sample, first_row=1))  # a rank's share
        torch.manual_seed(7)
        out["seeded_twice"] = as_dict(engine.generate([prompts[0], prompts[0]], sample))  # one prompt, 2 rows
        out["long_a"] = as_dict(engine.generate(long, sample))  # fills the prefix cache with A's KV
        timing["pushed_tensors"] = engine.push_weights(model_c)  # C's weights, but no prefix-cache reset
        out["long_stale"] = as_dict(engine.generate(long, sample))
        engine.reset_prefix_cache()
        out["long_fresh"] = as_dict(engine.generate(long, sample))
        engine.sync_weights(model_a)  # back to A through the public API (its reset included)
        out["long_back_a"] = as_dict(engine.generate(long, sample))
        t0 = time.perf_counter()
        engine.sync_weights(model_b)
        timing["sync_s"] = time.perf_counter() - t0
        out["gen_b"] = as_dict(engine.generate(prompts, sample))
        out["greedy_b"] = as_dict(engine.generate(prompts, greedy))
    finally:
        engine.close()
    timing["total_s"] = time.perf_counter() - t_start
    out["timing"] = timing
    torch.save(out, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:3])

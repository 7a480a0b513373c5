"""vLLM rollout engine on the tiny model: start-up, generate throughput, weight-sync time, and the
sampler/trainer log-prob mismatch, vs HF generate on the same prompts.

Runs in the CPU vLLM venv (scripts/setup_vllm_cpu.sh) or on a CUDA node with `pip install -e .[gpu]`:

    .venv-vllm/bin/python benchmarks/bench_vllm_sync.py                 # 16 prompts x 8 = 128 samples
    .venv-vllm/bin/python benchmarks/bench_vllm_sync.py --prompts 32 --n 8 --max-new-tokens 64
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kv-cache-mib", type=int, default=64)
    args = ap.parse_args()

    t0 = time.perf_counter()
    import torch

    from rpg.models.logprobs import response_logprobs
    from rpg.models.tiny import build_char_tokenizer, build_tiny_model
    from rpg.rollout.base import SamplingParams
    from rpg.rollout.hf import HFEngine
    from rpg.rollout.mismatch import mismatch_metrics
    from rpg.rollout.vllm import VLLMEngine

    print(f"imports            {time.perf_counter() - t0:7.2f} s")
    tok = build_char_tokenizer()
    model = build_tiny_model(max_positions=256, seed=0, tokenizer=tok)
    other = build_tiny_model(max_positions=256, seed=1, tokenizer=tok)
    prompts = [tok.encode(f"{i} + {3 * i} = ") for i in range(args.prompts)]
    sp = SamplingParams(n=args.n, temperature=args.temperature, max_new_tokens=args.max_new_tokens)

    t0 = time.perf_counter()
    engine = VLLMEngine(model, tok, kv_cache_memory_bytes=args.kv_cache_mib << 20, seed=0)
    print(f"engine start       {time.perf_counter() - t0:7.2f} s")
    try:
        engine.generate(prompts[:2], sp)  # warm-up
        for name, eng in (("vllm", engine), ("hf", HFEngine(model, tok))):
            best, tokens = float("inf"), 0
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                g = eng.generate(prompts, sp)
                best = min(best, time.perf_counter() - t0)
                tokens = int(g.response_mask.sum())
            rows = g.response_ids.shape[0]
            print(f"generate {name:5s}     {best:7.2f} s for {rows} samples, {tokens} tokens "
                  f"({tokens / best:8.0f} tok/s, best of {args.repeats})")
        g = engine.generate(prompts, sp)
        with torch.no_grad():
            trainer, _ = response_logprobs(model, g.input_ids, g.attention_mask, g.prompt_ids.shape[1],
                                           temperature=args.temperature)
        print("mismatch          ", {k: f"{v:.2e}" for k, v in mismatch_metrics(g.sampler_logp, trainer,
                                                                             g.response_mask).items()})
        times = []
        for target in (other, model) * args.repeats:
            t0 = time.perf_counter()
            engine.sync_weights(target)
            times.append(time.perf_counter() - t0)
        print(f"sync_weights       {min(times):7.3f} s best, {sum(times) / len(times):.3f} s mean "
              f"({sum(p.numel() for p in model.parameters()) / 1e3:.0f}k params)")
    finally:
        engine.close()


if __name__ == "__main__":
    main()
